"""The trained model: HF causal LM + optional peft LoRA, sharded with FSDP2.

The same path serves 1 and N ranks: every decoder layer and the root are
`fully_shard`-ed over a 1-D mesh of all ranks. For LoRA the reference policy
is the same module with the adapter disabled (no second copy); for full
fine-tuning it is a frozen, equally sharded copy.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from . import constants
from .algorithm import entropy_from_logits, lm_head_logprobs, token_logprobs
from .batch import FlatRows
from .config import ModelConfig, TrainerConfig
from .distributed import DistInfo

DTYPES = {name: getattr(torch, name) for name in constants.DTYPES}
ENTROPY_CHUNK = 128  # sequence positions per entropy chunk


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError("could not find the decoder layers to shard")


def set_recompute(model: nn.Module, count: int) -> None:
    """The first `count` decoder layers recompute their activations in backward, the others keep them.
    (HF's switch turns on every GradientCheckpointingLayer; each layer's own flag is read per call.)"""
    layers = _decoder_layers(model)
    if count:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count


# Graph variants one compiled forward may hold (grad / no grad, adapter on / off, input requiring grad or not).
COMPILE_VARIANTS = 32


def _compiled_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """What model.compile compiles in each decoder layer: its norms, its MLP and its attention's projections.
    The attention core stays eager (sdpa is one fused kernel already, and its mask, None or a tensor as the
    micro-batch has padding or not, would double the graphs)."""
    for layer in _decoder_layers(model):
        for name, child in layer.named_children():
            yield from child.children() if "attn" in name else (child,)


def set_compiled(model: nn.Module, on: bool) -> None:
    """The decoder layers' norms, MLPs and attention projections through torch.compile (on) or eager,
    in place: FSDP2's hooks and HF's per-layer recompute switch stay outside the compiled regions. Shapes
    are dynamic from the start (micro-batches vary), and each block class compiles once for all layers."""
    if on:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_VARIANTS)
    for block in _compiled_blocks(model):
        if on:
            block.compile(dynamic=True)
        else:
            block._compiled_call_impl = None


def _lora_targets(spec: str) -> str | list[str]:
    return "all-linear" if spec == "all-linear" else [s.strip() for s in spec.split(",") if s.strip()]


# Given the HF model's parameter shapes by name, tensors of those shapes
# owned by someone else (RolloutEngine.share_weights: vLLM's own weights).
SharedBase = Callable[[dict[str, tuple[int, ...]]], dict[str, Tensor]]


def _model_on_shared_base(
    model_path: str, cfg: ModelConfig, dtype: torch.dtype, shared_base: SharedBase, device: torch.device
) -> nn.Module:
    """The HF model built without weights of its own: every parameter is a
    view of a tensor from `shared_base` (frozen), so the base exists once."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:  # one tensor under one name, as the engine holds it
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    views = shared_base({name: tuple(p.shape) for name, p in model.named_parameters()})
    for name, view in views.items():
        if view.dtype != dtype:
            raise ValueError(f"shared {name} is {view.dtype}, the model computes in {dtype}")
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(view, requires_grad=False)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"no shared tensor for {len(missing)} parameters, e.g. {missing[0]}")
    return model.to(device)  # the buffers; the shared parameters are there already


def _final_hidden(
    module: nn.Module, hf: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
) -> Tensor:
    """The decoder's final (normed) hidden states, [B, T, H].

    Taken through the root module's own forward, so FSDP2's root hooks run as
    always: they all-gather the root-level parameters (embeddings, final norm,
    lm_head; the root keeps them unsharded until its post-backward) and
    reduce-scatter their grads after backward. logits_to_keep=[] hands the
    head zero positions, so no logits form; a hook catches the decoder output.
    """
    caught: list[Tensor] = []

    def catch(_mod: nn.Module, _args: tuple, out) -> None:
        caught.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = hf.get_decoder().register_forward_hook(catch)
    try:
        no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
               logits_to_keep=no_positions)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"expected one decoder forward, saw {len(caught)}")
    return caught[0]


def _logprobs_from_logits(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, entropy_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """The full-logits path, for heads lm_head_logprobs cannot take apart."""
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = token_logprobs(logits, targets)
    entropy = None
    if with_entropy and entropy_grad:
        entropy = entropy_from_logits(logits)
    elif with_entropy:
        # A metric only: chunked so no [B, T, vocab] fp32 temporary exists.
        with torch.no_grad():
            entropy = torch.cat([entropy_from_logits(c) for c in logits.detach().split(ENTROPY_CHUNK, dim=1)], dim=1)
    return logprobs, entropy


def _additive(sees: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool attention mask as an additive bias, made once per pass: sdpa would turn a bool mask into
    a bias in every layer. Its rows are 8-aligned (a view of a wider tensor): memory-efficient sdpa
    otherwise pads a copy of the bias in every layer."""
    width = -(-sees.shape[-1] // 8) * 8
    bias = torch.zeros(*sees.shape[:-1], width, dtype=dtype, device=sees.device)[..., : sees.shape[-1]]
    return bias.masked_fill_(~sees, torch.finfo(dtype).min)


def _unpacked(values: tuple[Tensor, Tensor | None], scored: Tensor) -> tuple[Tensor, Tensor | None]:
    """Packed per-token values ([M] or [1, M]) back into the rows' [B, T-1]
    layout (differentiably), 0 where nothing is scored."""
    place = lambda v: None if v is None else v.new_zeros(scored.shape).masked_scatter(scored, v.reshape(-1))  # noqa: E731
    return place(values[0]), place(values[1])


class Policy:
    def __init__(
        self, model_path: str, model_cfg: ModelConfig, trainer_cfg: TrainerConfig, info: DistInfo,
        *, needs_reference: bool = True, shared_base: SharedBase | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = model_cfg
        self.info = info
        self.is_lora = model_cfg.lora_rank > 0
        self.shares_base = shared_base is not None
        if self.shares_base and not self.is_lora:
            raise ValueError("only a frozen (LoRA) base can be shared with the engine")
        dtype = DTYPES[model_cfg.dtype]
        # Full fine-tuning keeps fp32 master weights and computes in bf16;
        # LoRA keeps the frozen base in the compute dtype (half the memory).
        load_dtype = dtype if self.is_lora else torch.float32
        if shared_base is not None:
            model = _model_on_shared_base(model_path, model_cfg, load_dtype, shared_base, info.device)
        elif model_cfg.load_format == "dummy":
            # Benchmarks: random weights in the real shape, built on the device.
            from transformers import AutoConfig

            with torch.device(info.device):
                model = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(model_path), dtype=load_dtype,
                    attn_implementation=model_cfg.attn_implementation,
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=load_dtype, attn_implementation=model_cfg.attn_implementation
            )
        model.config.use_cache = False
        # from_pretrained returns the model in eval mode, where HF skips gradient
        # checkpointing (GradientCheckpointingLayer checks self.training).
        model.train()
        if model_cfg.gradient_checkpointing:
            set_recompute(model, model_cfg.recomputed(len(_decoder_layers(model))))
        self.reference: nn.Module | None = None
        if self.is_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha,
                target_modules=_lora_targets(model_cfg.lora_target_modules), lora_dropout=0.0, bias="none",
            )
            model = get_peft_model(model, lora)
            # Adapter weights train in fp32 even over a bf16 base.
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            if model_cfg.gradient_checkpointing:
                model.enable_input_require_grads()
        elif needs_reference:  # only the KL term reads it; without KL it is a full copy wasted
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
        # FSDP2 offloads parameters, gradients and optimizer state together
        # (the optimizer step then runs on the CPU): either switch turns it on.
        wants_offload = trainer_cfg.param_offload or trainer_cfg.optimizer_offload
        offload = CPUOffloadPolicy() if wants_offload and info.device.type == "cuda" else None
        for module in [model] + ([self.reference] if self.reference is not None else []):
            self._shard(module, mp, offload)
            if model_cfg.compile:
                set_compiled(module, True)
        self.model = model

    def _shard(self, module: nn.Module, mp: MixedPrecisionPolicy | None, offload: CPUOffloadPolicy | None) -> None:
        kwargs: dict = {"mesh": self.mesh}
        if self.shares_base:  # the shared base is the engine's: FSDP2 must neither shard nor copy it
            kwargs["ignored_params"] = {p for p in module.parameters() if not p.requires_grad}
        if mp is not None:
            kwargs["mp_policy"] = mp
        if offload is not None:
            kwargs["offload_policy"] = offload
        for layer in _decoder_layers(module):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        if offload is None:
            module.to(self.info.device)

    # ------------------------------------------------------------ compute
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, temperature: float, *, reference: bool = False,
        with_entropy: bool = False, entropy_grad: bool = False, layout: FlatRows | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs of input_ids[:, 1:] under the policy, shape [B, T-1] (fp32),
        and their entropy if asked (differentiable only with entropy_grad).

        The LM head is applied a chunk of tokens at a time to the final hidden
        states (algorithm.lm_head_logprobs), so the [B, T, vocab] logits and
        their gradient never exist. `layout` (batch.pack_rows, batch.group_prompts):
        the same rows run in that layout instead of padded; the results come back
        in the same [B, T-1] layout, 0 where the layout scores nothing.
        """
        if reference and self.is_lora:
            ctx = self._adapter_disabled()
            module = self.model
        else:
            ctx = nullcontext()
            module = self.reference if reference else self.model
        hf = module.get_base_model() if hasattr(module, "get_base_model") else module
        head = hf.get_output_embeddings()
        if layout is not None:
            # use_cache=False matters: with a cache transformers ignores packed rows' restarts.
            ids, mask, positions = layout.input_ids, layout.attention_mask, layout.position_ids
            if mask is not None:
                mask = _additive(mask, DTYPES[self.cfg.dtype])
            # [1, M, ...]: the scored positions as one row
            pick = lambda x: x.reshape(-1, *x.shape[2:])[layout.sources][None]  # noqa: E731
            targets = layout.targets[None]
        else:
            ids, mask, positions, targets = input_ids, attention_mask, None, input_ids[:, 1:]
            pick = lambda x: x[:, :-1]  # noqa: E731
        # The head runs inside the context too: leaving peft's disable_adapter reshards an FSDP2 root whose
        # first forward ran in it (a step's first pass is the reference's when one mini-batch needs no old log-probs).
        with ctx:
            if type(head) is not nn.Linear:
                # e.g. peft-wrapped (lm_head in the LoRA targets) or its own FSDP
                # unit: only its forward knows its effective weight.
                logits = module(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
                out = _logprobs_from_logits(pick(logits), targets, temperature, with_entropy, entropy_grad)
            else:
                hidden = _final_hidden(module, hf, ids, mask, positions)
                if isinstance(head.weight, DTensor):
                    raise RuntimeError("lm_head is still sharded after the root forward (the FSDP2 root must not "
                                       "reshard after forward)")
                out = lm_head_logprobs(pick(hidden), head.weight, head.bias, targets, temperature=temperature,
                                       with_entropy=with_entropy)
        if out[1] is not None and not entropy_grad:
            out = (out[0], out[1].detach())
        return _unpacked(out, layout.scored) if layout is not None else out

    @contextmanager
    def _adapter_disabled(self) -> Iterator[None]:
        """The base model alone. peft's disable_adapter also clears the
        adapter's requires_grad; if FSDP2's lazy init falls in this forward
        (a step's first policy forward is the reference pass), it then sees
        no trainable parameter and reduces the adapter's gradients in bf16,
        which cannot be assigned to the fp32 adapter (the first backward
        fails). The flags are restored inside the context; under no_grad
        they change nothing else."""
        trainable = self.trainable_parameters()
        with self.model.disable_adapter():
            for p in trainable:
                p.requires_grad_(True)
            yield

    def end_no_grad_passes(self) -> None:
        """After forwards without a backward (log-prob passes): the root's parameters, which its forward
        left unsharded, are resharded. Otherwise the next backward adds into what the unsharded root
        kept from before: full fine-tuning's embedding, final norm and lm_head gradients grew by one
        step's worth per step (tests/test_policy_logprobs.py)."""
        for module in (self.model, self.reference):
            if module is not None:
                module.reshard()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------ state
    def _options(self, **kw) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Full (gathered) trainable tensors on CPU; complete on rank 0."""
        return get_model_state_dict(self.model, options=self._options())

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        set_model_state_dict(self.model, state, options=self._options(strict=False))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        return get_optimizer_state_dict(self.model, optimizer, options=self._options())

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        set_optimizer_state_dict(self.model, optimizer, state, options=self._options())
