"""Everything that draws image-length sequences, behind one interface: facert at a config, and
what users would pick instead — transformers' GPT-2 of the same shape with its KV cache (b) and
onnxruntime-genai's generate loop on facert's exported decoder (c). Each `generate(batch, seed)`
draws `batch` rows of 256 tokens after the same prompt length and returns the step times.

Competitor packages are optional: `make` returns a reason instead when one is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facert.runtime.config import VOCAB_FILE, ModelConfig, load_config
from facert.runtime.model import FaceModel
from facert.runtime.sequence import TOP_K, SamplingParams
from facert.runtime.tasks import Templates
from facert.runtime.tokenizer import WordPieceTokenizer

from .models import label
from .timing import Run, timed

# About 40 ids with the template, the prompt length the competitors get too.
DESCRIPTION = (
    "this smiling young woman has long wavy blond hair , arched eyebrows , high cheekbones , "
    "rosy cheeks , a pointy nose and narrow eyes . she wears heavy makeup , lipstick and "
    "earrings , and looks attractive"
)
COMPETITORS = ("transformers", "genai")


class Facert:
    def __init__(
        self, model_dir: Path, config: tuple[str, str], threads: int | None = None, slots: int = 16
    ):
        self.name = label(config)
        self.model = FaceModel(
            model_dir, backend=config[0], precision=config[1], threads=threads, num_slots=slots,
            progress=False,
        )  # fmt: skip

    def generate(
        self, batch: int, seed: int, new_tokens: int | None = None, full_head: bool = False
    ) -> Run:
        seqs = [
            self.model.templates.to_image(DESCRIPTION, SamplingParams(seed=seed), i)
            for i in range(batch)
        ]
        for s in seqs:
            s.max_new_tokens = new_tokens or s.max_new_tokens
            if full_head:
                s.window = (0, self.model.config.lm.vocab_size)
        return timed(lambda tick: self.model.engine.run(seqs, tick))

    def kv_bytes(self) -> int:
        return self.model.backend.k_cache.nbytes + self.model.backend.v_cache.nbytes


class FullHead:
    """facert computing the whole vocabulary's logits at every step, as (b) and (c) do, instead
    of the 1024 image codes: beside `Facert` it shows what the kernel wins and what the window
    wins. It shares the Facert's model."""

    def __init__(self, facert: Facert):
        self.facert, self.name = facert, f"{facert.name}, full head"

    def generate(self, batch: int, seed: int, new_tokens: int | None = None) -> Run:
        return self.facert.generate(batch, seed, new_tokens, full_head=True)


class Transformers:
    name = "transformers GPT-2 (KV cache, torch fp32)"

    def __init__(self, config: ModelConfig, prompt_len: int):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        lm = config.lm
        torch.manual_seed(0)  # random init, nothing downloaded
        gpt2 = GPT2Config(
            vocab_size=lm.vocab_size, n_positions=lm.max_positions, n_embd=lm.n_embd,
            n_layer=lm.n_layer, n_head=lm.n_head, n_inner=lm.n_ffn,
            bos_token_id=None, eos_token_id=None,  # never stop early
        )  # fmt: skip
        self.model = GPT2LMHeadModel(gpt2).eval()
        self.vocab, self.prompt_len = lm.vocab_size, prompt_len
        self.new_tokens = config.vqgan.num_codes_per_image
        self.cache = None

    def generate(self, batch: int, seed: int, new_tokens: int | None = None) -> Run:
        import torch
        from transformers.generation.streamers import BaseStreamer

        n = new_tokens or self.new_tokens
        rng = np.random.default_rng(seed)
        ids = torch.as_tensor(rng.integers(0, self.vocab, (batch, self.prompt_len)))
        torch.manual_seed(seed)

        class Ticks(BaseStreamer):
            """generate() puts the prompt first, then each step's tokens."""

            def __init__(self, tick):
                self.tick, self.prompt_seen = tick, False

            def put(self, value):
                if self.prompt_seen:
                    self.tick(batch)
                self.prompt_seen = True

            def end(self):
                pass

        def call(tick) -> None:
            with torch.inference_mode():
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=TOP_K,
                    max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0,
                    streamer=Ticks(tick), return_dict_in_generate=True,
                )  # fmt: skip
            self.cache = out.past_key_values

        return timed(call)

    def kv_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


class GenAI:
    name = "onnxruntime-genai (fp32)"

    def __init__(self, model_dir: Path, config: ModelConfig, prompt_len: int, threads: int | None):
        import onnxruntime_genai as og

        from .genai_decoder import build

        self.og, self.lm, self.prompt_len = og, config.lm, prompt_len
        self.model = og.Model(str(build(model_dir, threads)))
        self.new_tokens = config.vqgan.num_codes_per_image
        self.allocated = 0

    def generate(self, batch: int, seed: int, new_tokens: int | None = None) -> Run:
        total = self.prompt_len + (new_tokens or self.new_tokens)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=total, min_length=total, batch_size=batch, do_sample=True, top_k=TOP_K,
            random_seed=seed,
        )  # fmt: skip
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, self.lm.vocab_size, (batch, self.prompt_len)).astype(np.int32)

        def call(tick) -> None:
            generator = self.og.Generator(self.model, params)
            generator.append_tokens(ids)
            while not generator.is_done():
                generator.generate_next_token()
                tick(batch)

        # genai's shared buffers: keys and values of every layer, for max_length positions.
        self.allocated = 2 * self.lm.n_layer * batch * self.lm.n_embd * total * 4
        return timed(call)

    def kv_bytes(self) -> int:
        return self.allocated


def prompt_length(model_dir: Path) -> int:
    """Ids in facert's to_image prompt for DESCRIPTION: the competitors' prompt length."""
    templates = Templates(load_config(model_dir), WordPieceTokenizer(Path(model_dir) / VOCAB_FILE))
    return len(templates.to_image(DESCRIPTION, SamplingParams(), 0).prompt_ids)


def make(
    kind: str, model_dir: Path, threads: int | None = None, slots: int = 16
) -> Facert | Transformers | GenAI | str:
    """A contestant by kind ('BACKEND:PRECISION', 'transformers' or 'genai'), or why not."""
    if kind not in COMPETITORS:
        backend, precision = kind.split(":")
        return Facert(model_dir, (backend, precision), threads, slots)
    config, prompt_len = load_config(model_dir), prompt_length(model_dir)
    try:
        if kind == "transformers":
            return Transformers(config, prompt_len)
        return GenAI(model_dir, config, prompt_len, threads)
    except ImportError as e:
        package = "transformers" if kind == "transformers" else "onnxruntime-genai"
        return f"{package} is not installed ({e.msg}); pip install 'facert[bench]'"


def ready_competitors(
    model_dir: Path, threads: int | None, wanted: bool = True
) -> tuple[list[Transformers | GenAI], list[dict[str, str]]]:
    """The competitors that can run here, and {contestant, reason} for each that cannot."""
    ready, skipped = [], []
    for kind in COMPETITORS if wanted else ():
        c = make(kind, model_dir, threads)
        if isinstance(c, str):
            skipped.append({"contestant": kind, "reason": c})
        else:
            ready.append(c)
    return ready, skipped
