"""What both generation routes share: the model-name check, request ids, and request fields -> SamplingParams."""
from __future__ import annotations

import secrets
import time

from ..engine.sampling_params import SamplingParams
from .engine_client import EngineClient
from .errors import APIError, bad_request
from .protocol import SamplingFields

# Request fields that map one-to-one onto SamplingParams fields (None = "use the default").
_PASSTHROUGH = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos",
                "skip_special_tokens", "include_stop_str_in_output")


class Serving:
    def __init__(self, client: EngineClient, model_names: list[str], chat_template: str | None = None):
        self.client = client
        self.model_names = model_names
        self.chat_template = chat_template
        self.created = int(time.time())

    def model_for(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.model_names))}", param="model", code="model_not_found")
        return requested

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(12)}"

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if req.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        given = {f: getattr(req, f) for f in _PASSTHROUGH if getattr(req, f) is not None}
        # a non-streamed request reads only its final output, a stream each step's new part: the engine copies
        # nothing that grows with the output at every step
        given.update(max_tokens=max_tokens, logprobs=logprobs,
                     output_kind="delta" if getattr(req, "stream", False) else "final_only")
        return self.client.sampling_params(**given)


def usage(out) -> dict:
    """Token counts of a request from its last output (a delta output holds only its step's tokens: the engine's
    metrics carry the count)."""
    p = len(out.prompt_token_ids)
    c = (out.metrics or {}).get("num_output_tokens", len(out.outputs[0].token_ids))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
