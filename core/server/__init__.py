"""The OpenAI-compatible HTTP server: `paged serve` builds an app with `build_app` over an `AsyncEngine`."""
