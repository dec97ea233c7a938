"""Cost of prompt expansion with the embedded SmolLM2-135M-Instruct GGUF: loading and writing.

    python benchmarks/prompt_expansion.py [--repeats 2] [--tokens 64] [--threads N]

1. Load: our one-pass GGUF reader (`ChatModel.load`) against transformers' own `gguf_file=` loader (tokenizer,
   then model), alternating so that load from other processes hits both alike; times are medians. The two
   models' logits on one chat are compared, as a check that both read the same weights.
2. Expand: `expand_prompt` with the wan preset, greedy and sampled, `--tokens` new tokens at most: seconds and
   tokens per second.

The last line reads `prompt_expansion: load transformers/ours=R expand=S s`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sora.prompt_expansion import (
    ChatModel,
    Sampling,
    default_model_path,
    expand_prompt,
    wan_messages,
)


def load_ours() -> ChatModel:
    model = ChatModel()
    model.load()
    return model


def load_transformers():
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return model.eval(), tokenizer


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours_s, theirs_s = [], []
    for _ in range(args.repeats):
        seconds, ours = timed(load_ours)
        ours_s.append(seconds)
        seconds, (theirs, theirs_tokenizer) = timed(load_transformers)
        theirs_s.append(seconds)
    print(f"{'step':<34}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'load: ours (one GGUF pass)':<34}{statistics.median(ours_s):>10.2f}{'':>10}")
    print(f"{'load: transformers gguf_file=':<34}{statistics.median(theirs_s):>10.2f}{'':>10}")
    chat = wan_messages("a cat surfing")
    ids = ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    same_ids = ids == theirs_tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = (ours.model(torch.tensor([ids])).logits - theirs(torch.tensor([ids])).logits).abs().max().item()
    del theirs
    print(f"same prompt tokens: {same_ids}; max |logit difference|: {diff:.2e}")
    expand_s = []
    for creativity in (0.0, 0.7):
        seconds, reply = timed(ours.reply, chat,
                               sampling=Sampling.from_creativity(creativity), max_new_tokens=args.tokens)
        expand_s.append(seconds)
        print(f"{f'reply: creativity {creativity}, {reply.tokens} tokens':<34}{seconds:>10.2f}"
              f"{reply.tokens / seconds:>10.1f}")
    caption = expand_prompt("a cat surfing", model=ours, max_new_tokens=args.tokens)
    print(f"example: {caption}")
    ratio = statistics.median(theirs_s) / statistics.median(ours_s)
    print(f"prompt_expansion: load transformers/ours={ratio:.2f} expand={statistics.median(expand_s):.2f} s")


if __name__ == "__main__":
    main()
