"""`dllm generate`: one request from the command line, printed plainly, as JSON, or live."""
