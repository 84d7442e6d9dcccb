"""Intel Gaudi (HPU) through habana_frameworks.torch; nothing here imports it until the backend is probed."""
