"""Training speed as logged with each train record: tokens per second and model FLOPs utilisation.

MFU (PaLM's definition) is the model's FLOPs per training token (calm_edge/flops.py: the matrix
products of forward and backward, attention included, recomputation not) times tokens per second,
over the peak FLOP/s of all the job's devices. The peak is the training section's `peak_flops`
when set, else the dense bfloat16 peak of a known GPU (its data sheet figure, without sparsity);
on a CPU or an unknown GPU no MFU is logged unless `peak_flops` is given.
"""
import time

import torch

# Dense bfloat16 tensor-core peaks in FLOP/s, by a name fragment of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower, set peak_flops for it
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def peak_flops(device, configured=0.0):
    """The peak FLOP/s of one `device`: `configured` if positive, a known GPU's, else 0 (unknown)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAK_BF16.items():
            if fragment in name:
                return peak
    return 0.0


class Throughput:
    """Tokens per second, and MFU when the peak is known, over the interval since the last call."""

    def __init__(self, flops_per_token, peak, tokens_seen=0):
        self.flops_per_token, self.peak = flops_per_token, peak
        self.tokens, self.clock = tokens_seen, time.perf_counter()

    def restart(self, tokens_seen):
        """Start the next interval now (after validation or a checkpoint, which are not training)."""
        self.tokens, self.clock = tokens_seen, time.perf_counter()

    def since_last(self, tokens_seen):
        now = time.perf_counter()
        seconds = max(now - self.clock, 1e-9)
        rate = (tokens_seen - self.tokens) / seconds
        self.tokens, self.clock = tokens_seen, now
        record = {"tokens_per_second": rate}
        if self.peak > 0:
            record["mfu"] = rate * self.flops_per_token / self.peak
        return record
