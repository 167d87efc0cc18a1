"""`dllm serve`: the OpenAI-compatible server. protocol.py (the wire format -> Request), worker.py (the
engine thread), metrics.py, app.py (routes and streaming), main.py (the command line)."""
