"""`calm-edge serve`: an OpenAI-compatible HTTP server over the runtime's in-flight batching `Engine`.

    protocol.py   the OpenAI request bodies (validated), the chat template, responses and chunks
    worker.py     the Engine in a thread of its own, its queue bound, timeouts and cancellations
    metrics.py    the Prometheus metrics of /metrics
    app.py        the FastAPI application and `serve()`, which runs it under uvicorn
"""
