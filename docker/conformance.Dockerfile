# syntax=docker/dockerfile:1
# The backend conformance suite's image: one vendor's runtime image plus pytest and the tests. docker-bake.hcl
# builds one per vendor (target <vendor>-conformance, on top of target <vendor>); by hand, from the repository root:
#   docker build -f docker/conformance.Dockerfile --build-arg RUNTIME_IMAGE=paged:cpu -t paged:cpu-conformance .
# Run (with the vendor's device flags, see its Dockerfile):
#   docker run --rm -e PAGED_MATRIX_OUT=/matrices/cpu.json -v "$PWD/matrices:/matrices" paged:cpu-conformance
ARG RUNTIME_IMAGE=paged:cpu
FROM ${RUNTIME_IMAGE}

USER 0:0
WORKDIR /opt/paged
# The runtime image's interpreter (a venv, or the system one where the vendor's torch lives there).
RUN python3 -m pip install --no-cache-dir pytest==9.0.3 pytest-timeout==2.4.0 hypothesis==6.155.2 \
    && chown 10001:10001 /opt/paged
# The tests run from /opt/paged, next to the pyproject.toml that holds pytest's settings; the folder is the
# test user's, for pytest's and hypothesis's caches.
COPY tests/ tests/
USER 10001:10001

ENTRYPOINT ["python3", "-m", "pytest"]
CMD ["tests/backends", "-q"]
