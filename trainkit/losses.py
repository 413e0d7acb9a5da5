"""The training loss of a language model with a large vocabulary, a few rows of logits at a time."""

from __future__ import annotations

import torch

def cross_entropy_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits ChunkedCrossEntropy takes at a time.

    On a CPU each chunk's float32 rows are passed over about seven times (max, subtract, exp, sum, divide,
    ...), so they should stay in cache in between: about 2 MiB of them per thread, one core's L2 cache on
    current x86 CPUs (1 MiB on AMD Zen 4, 1.25 to 2 MiB on Intel Xeons; each thread works on its share of the
    rows), rounded down to a power of two. On a 2-core AMD EPYC (Zen 4), bf16 logits, one thread, the best
    chunk held 1.6 to 2 MiB for vocabularies of 8,192, 32,000 and 50,257 (64, 16 and 8 rows), and 8 times
    that ran 1.8x to 3.4x slower. On a GPU: big chunks, so few kernel launches.
    """
    if device.type != "cpu":
        return 4096
    rows = max(1, (2 << 20) * torch.get_num_threads() // (4 * vocab))
    return 1 << (rows.bit_length() - 1)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, vocab) against targets (N,), a few rows at a time.

    Same value and gradient as F.cross_entropy(logits.float(), targets, label_smoothing=smoothing), but
    the float32 copy of the logits never exists whole: with GPT-2's 50k-token vocabulary it is the largest
    tensor of the step, and on a CPU the passes over it cost more than the output matmul itself. Each chunk
    is converted, used and dropped while it is still in cache, and its gradient,
    (softmax(logits) - smoothed onehot(target)) / N,
    is written in the same pass, so backward only scales it.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        n, vocab = logits.shape
        chunk = cross_entropy_chunk_rows(vocab, logits.device)
        loss = logits.new_zeros((), dtype=torch.float32)
        # The gradient is kept in the logits' dtype, except fp16: entries of softmax / N fall below fp16's
        # smallest number (6e-8) and would be lost before backward could apply the loss scale to them.
        grad_dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype
        grad_logits = torch.empty_like(logits, dtype=grad_dtype)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            x = logits[rows].float()  # a view if the logits are float32 already
            # Build the softmax where its gradient goes when that is float32, so no pass is spent copying.
            p = grad_logits[rows] if grad_logits.dtype == torch.float32 else torch.empty_like(x)
            torch.sub(x, x.amax(dim=-1, keepdim=True), out=p)  # so exp cannot overflow; softmax is unchanged
            row_index, tgt = torch.arange(p.shape[0]), targets[rows]
            target_logit = p[row_index, tgt]
            if smoothing:  # the target is (1 - s) * onehot + s * uniform
                target_logit = (1 - smoothing) * target_logit + smoothing * p.mean(dim=-1)
            total = p.exp_().sum(dim=-1, keepdim=True)
            loss += (total.log()[:, 0] - target_logit).sum()  # -sum_v target_v * log softmax(x)_v
            p.div_(total * n)  # softmax / N
            if smoothing:
                p.sub_(smoothing / (vocab * n))
            p[row_index, tgt] -= (1.0 - smoothing) / n
            if p.dtype != grad_logits.dtype:
                grad_logits[rows] = p
        ctx.save_for_backward(grad_logits)
        ctx.logits_dtype = logits.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_logits,) = ctx.saved_tensors
        # Backward runs once per forward (retain_graph is not supported), so scale in place: no extra pass.
        # `grad` carries the fp16 loss scale, applied here before the cast back to fp16.
        return grad_logits.mul_(grad).to(ctx.logits_dtype), None, None
