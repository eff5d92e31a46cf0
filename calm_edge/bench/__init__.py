"""`calm-edge bench`: CALM against token-by-token generation, side by side, on the same prompts.

    matrix.py   the cells to measure (prompt lengths x new tokens x batch sizes x threads x temperatures)
    prompts.py  the same token ids for every runner, cut from one text
    stats.py    median / p90 / p99 and memory (peak RSS per cell, package size)
    runners.py  one way to generate per runner: a calm-edge package (CALM or AR), optimum's
                ORTModelForCausalLM, onnxruntime-genai; each returns a `Trace` of one generation
    worker.py   runs one runner over the matrix in its own process (clean memory figures, and a
                peer that crashes or cannot be imported cannot take the others down)
    harness.py  drives the workers with a progress bar and assembles the report
    output.py   JSON, CSV and PNG plots (the README's performance block: benchmarks/report.py)
"""
