"""Request bodies of the OpenAI / vLLM routes (pydantic models).

Every model forbids unknown fields: a field this server does not implement (logit_bias,
suffix, tools, response_format, ...) is a 400 naming it, never silently ignored. Value
ranges are checked here; semantics live in engine.py / sampling.py.
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid")
TokenIds = List[int]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = _STRICT
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    stop_token_ids: Optional[TokenIds] = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # an end-user id for the caller's logs; it does not change the output


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], TokenIds, List[TokenIds]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read extra keys (name, ...)
    role: str
    content: Union[str, List[Dict], None] = None


class ChatRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


class LoadLoraRequest(BaseModel):
    model_config = _STRICT
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    model_config = _STRICT
    lora_name: str = Field(min_length=1)


class AdapterRequest(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    pin: bool = False
    wait: bool = True
    kind: Literal["lora"] = "lora"
