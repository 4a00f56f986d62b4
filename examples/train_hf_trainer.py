"""Train a Hugging Face causal LM with einfuse through the Hugging Face Trainer.

Hand the Trainer the optimized model: it is an instance of the model's own class (a subclass whose
forward runs through einfuse), so the Trainer, its optimizer and its checkpointing see the usual
parameter names. Byte-level text, a small random-weight Llama: nothing is downloaded.

    python examples/train_hf_trainer.py --text ../shared/data/tinyshakespeare.txt --steps 20
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import einfuse
from einfuse.runtime import counters

from train_hf_loop import FALLBACK_TEXT, tiny_llama


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of `seq` bytes; labels are the inputs (the model shifts them)."""

    def __init__(self, text: str, seq: int, n: int):
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        stride = max(1, (data.numel() - seq - 1) // n)
        self.items = [data[i * stride:i * stride + seq] for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def main(argv: list[str] | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="a text file to train on (bytes as tokens)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args(argv)

    text = Path(a.text).read_text() if a.text else FALLBACK_TEXT
    model = einfuse.optimize(tiny_llama(a.layers))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                                 learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(text, a.seq, a.steps * a.batch))
        with counters.counting() as calls:
            result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trained {result.global_step} steps; training loss {result.training_loss:.4f}")
    print("fusions:", model.einfuse_report.fusions)
    print("fused-op calls:", dict(calls))
    return {"losses": losses, "calls": dict(calls), "fusions": model.einfuse_report.fusions}


if __name__ == "__main__":
    main()
