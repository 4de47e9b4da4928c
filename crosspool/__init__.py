"""CrossPool: multi-LLM serving for cold MoE models with KV-cache and weight disaggregation."""

from crosspool.config import EngineConfig
from crosspool.engine.llm import LLM
from crosspool.engine.output import RequestOutput
from crosspool.engine.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
