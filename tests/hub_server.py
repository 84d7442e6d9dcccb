"""A stand-in for the Hugging Face Hub's HTTP API, so huggingface_hub's own download code fills a real Hub cache.

No machine here reaches the Hub. This answers the three calls `snapshot_download` makes (a revision's info,
its file tree, and each file's HEAD and GET under /resolve/), from repositories held in memory, each
revision a commit of plain (non-LFS) files whose ids are git blob hashes, as the Hub names them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit hash -> path -> content
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit hash

    def commit(self, files: dict[str, bytes], *refs: str) -> str:
        """Add a commit holding `files` and point `refs` (branches or tags) at it; returns its hash."""
        sha = hashlib.sha1(repr(sorted((p, blob_id(c)) for p, c in files.items())).encode()).hexdigest()
        self.commits[sha] = files
        self.refs.update(dict.fromkeys(refs, sha))
        return sha

    def resolve(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.refs.get(revision)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.downloaded: list[str] = []  # every file GET, as "repo/path"

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def _find(self, request: Request) -> tuple[str, Repo, str] | Response:
        repo_id = f"{request.path_params['owner']}/{request.path_params['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, 404, headers={"X-Error-Code": "RepoNotFound"})
        sha = repo.resolve(request.path_params["revision"])
        if sha is None:
            return JSONResponse({"error": "Invalid rev id"}, 404, headers={"X-Error-Code": "RevisionNotFound"})
        return repo_id, repo, sha

    async def info(self, request: Request) -> Response:
        found = self._find(request)
        if isinstance(found, Response):
            return found
        repo_id, repo, sha = found
        return JSONResponse({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                             "siblings": [{"rfilename": path} for path in repo.commits[sha]]})

    async def tree(self, request: Request) -> Response:
        found = self._find(request)
        if isinstance(found, Response):
            return found
        _, repo, sha = found
        return JSONResponse([{"type": "file", "path": path, "size": len(content), "oid": blob_id(content)}
                             for path, content in repo.commits[sha].items()])

    async def resolve(self, request: Request) -> Response:
        found = self._find(request)
        if isinstance(found, Response):
            return found
        repo_id, repo, sha = found
        path = request.path_params["path"]
        content = repo.commits[sha].get(path)
        if content is None:
            return JSONResponse({"error": "Entry not found"}, 404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_id(content)}"', "Content-Length": str(len(content))}
        if request.method == "HEAD":
            return Response(headers=headers)
        self.downloaded.append(f"{repo_id}/{path}")
        return Response(content, headers=headers, media_type="application/octet-stream")

    def app(self) -> Starlette:
        revision = "/{owner}/{name}"
        return Starlette(routes=[
            Route("/api/models" + revision + "/revision/{revision:path}", self.info),
            Route("/api/models" + revision + "/tree/{revision}", self.tree),
            Route(revision + "/resolve/{revision}/{path:path}", self.resolve, methods=["GET", "HEAD"]),
        ])


@contextmanager
def serving(hub: FakeHub, port: int) -> Iterator[str]:
    """Serve `hub` on 127.0.0.1:port in a thread; yields its endpoint (for HF_ENDPOINT)."""
    server = uvicorn.Server(uvicorn.Config(hub.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the fake Hub did not start")
        threading.Event().wait(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
