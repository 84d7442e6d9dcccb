"""The OpenAI-compatible HTTP server: a supervisor (launcher.py) runs the engine core (core_process.py) and
API servers (api_process.py), each an app from `build_app` over an `EngineClient`."""
