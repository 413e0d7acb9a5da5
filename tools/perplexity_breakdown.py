"""Where a llama.py checkpoint's perplexity comes from: tokens the training text never shows, and the rest.

    python tools/perplexity_breakdown.py --data-dir DIR [--tokenizer DIR] [--checkpoint PATH] [--split validation]

The split is cut into the same windows as llama.py's evaluation. For a token that never occurs in the
training split, a model can at best know that some unseen token comes next: spreading that share s of the
probability evenly over the m vocabulary entries it has never seen costs ln(m / s) nats per such token.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":  # run as a script: the repository's llama.py (imported, e.g. by the tests: theirs)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama  # noqa: E402
import trainkit  # noqa: E402
from extras import llama_commands  # noqa: E402


@torch.no_grad()
def token_losses(model: llama.Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, loss of each) over the split, in llama.evaluate's windows, in fp32."""
    model.eval()
    targets, losses = [], []
    for window in llama.eval_windows(tokens, model.params.max_seq_len):
        logits = model(window[None, :-1])[0]
        losses.append(F.cross_entropy(logits.float(), window[1:], reduction="none"))
        targets.append(window[1:])
    return torch.cat(targets), torch.cat(losses)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=llama.CHECKPOINT)
    p.add_argument("--data-dir", help="local folder with wiki.{train,valid,test}.raw (default: the Hub)")
    p.add_argument("--tokenizer", help="default: the checkpoint's")
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    args = p.parse_args(argv)
    with trainkit.one_line_errors("perplexity_breakdown.py"):
        model, ckpt = llama_commands.load_checkpoint(args.checkpoint)
        tokenizer = llama.tokenizer_for(model, args.tokenizer or ckpt.get("tokenizer") or "gpt2")
        raw = llama.load_wikitext(args.data_dir, "Salesforce/wikitext", "wikitext-2-raw-v1")
        streams = llama.tokenize_splits(raw, tokenizer)

    seen = torch.zeros(model.params.vocab_size, dtype=torch.bool)
    seen[streams["train"].long()] = True
    targets, losses = token_losses(model, streams[args.split])
    unseen = ~seen[targets]
    share, missing = unseen.float().mean().item(), int((~seen).sum())
    print(f"{args.checkpoint}, {args.split} split: {len(targets):,} predicted tokens; the training split has "
          f"{int(seen.sum()):,} distinct tokens, so {missing:,} vocabulary entries never occur in it")
    print(f"  never in training: {int(unseen.sum()):,} tokens ({100 * share:.2f}%), mean loss "
          f"{losses[unseen].mean():.2f} nats; floor ln({missing:,} / {share:.4f}) = {math.log(missing / share):.2f}")
    print(f"  seen in training:  {int((~unseen).sum()):,} tokens, mean loss {losses[~unseen].mean():.3f} nats, "
          f"perplexity {losses[~unseen].mean().exp():.1f}")
    print(f"  all:               mean loss {losses.mean():.3f} nats, perplexity {losses.mean().exp():.1f}, of "
          f"which the unseen tokens contribute {(losses[unseen].sum() / len(losses)):.3f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
