"""LLM: the offline Python API. Load several models, generate for a list of prompts."""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from crosspool.config import EngineConfig, is_distributed
from crosspool.engine.engine import Engine

if TYPE_CHECKING:
    from crosspool.engine.distributed import DistributedEngine
from crosspool.engine.output import RequestOutput
from crosspool.engine.sampling import SamplingParams

ModelsArg = str | os.PathLike[str] | Seq[str | os.PathLike[str]] | dict[str, str | os.PathLike[str]]


def model_names(models: ModelsArg) -> dict[str, str]:
    """Normalise the `models` argument to {served name: directory}; names default to directory names."""
    if isinstance(models, dict):
        return {str(k): str(v) for k, v in models.items()}
    if isinstance(models, str | os.PathLike):
        models = [models]
    out: dict[str, str] = {}
    for m in models:
        name = Path(m).name
        if name in out:
            raise ValueError(f"two models are named {name!r}; pass a dict {{name: path}}")
        out[name] = str(m)
    return out


def create_engine(models: dict[str, str], config: EngineConfig) -> Engine | DistributedEngine:
    """One process (`Engine`) or a world of KV and weights ranks (`DistributedEngine`), per the layout."""
    if is_distributed(config):
        from crosspool.engine.distributed import DistributedEngine

        return DistributedEngine(models, config)
    return Engine(models, config)


class LLM:
    def __init__(self, models: ModelsArg, config: EngineConfig | None = None, **config_kwargs: object) -> None:
        if config is not None and config_kwargs:
            raise ValueError("pass either config or keyword settings, not both")
        self.engine = create_engine(model_names(models), config or EngineConfig(**config_kwargs))

    def close(self) -> None:
        """Release KV pages and stop any pool ranks."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model_names(self) -> list[str]:
        return list(self.engine.models)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        model: str | list[str] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); `model` names one model for all prompts or one
        per prompt (default: the only model). Outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        models = self._per_prompt(model, n, "model")
        plist = self._per_prompt(params or SamplingParams(), n, "params")
        ids = [self.engine.add_request(m, p, sp) for m, p, sp in zip(models, prompts, plist, strict=True)]
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=n, desc="generate", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for rid in ids:                  # a failed step: this call's requests go, the engine stays usable
                if rid not in done:
                    self.engine.abort(rid)
            raise
        return [done[i] for i in ids]

    def _per_prompt(self, value: object, n: int, what: str) -> list:
        if value is None:
            if len(self.engine.models) != 1:
                raise ValueError(f"several models are loaded ({self.model_names}); say which with model=")
            value = self.model_names[0]
        if isinstance(value, list):
            if len(value) != n:
                raise ValueError(f"{what}: got {len(value)} values for {n} prompts")
            return value
        return [value] * n
