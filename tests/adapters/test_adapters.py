"""Adapters: shapes, token masking, determinism, trainability, save/load, config validation, registry."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from csaligner.adapters import (
    ADAPTERS,
    Adapter,
    AdapterConfig,
    IdentityAdapter,
    LinearAdapter,
    MLPAdapter,
    PriorTransformerAdapter,
    build_adapter,
    check_settings_apply,
    kind_settings,
    load_adapter,
    read_adapter_config,
    register_adapter,
    save_adapter,
    serialization,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads; on a loaded 2-core box, thread handoffs made a 30-step
    prior fit swing from 0.4 s to 17 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_PRIOR = {"num_layers": 2, "num_heads": 2, "head_dim": 4, "max_text_tokens": 8}


def make_config(kind: str, in_dim: int = 8, out_dim: int = 6, **kw: object) -> AdapterConfig:
    if kind == "identity":
        out_dim = in_dim
    extra = {**TINY_PRIOR, **kw} if kind == "prior" else kw
    return AdapterConfig(kind=kind, in_dim=in_dim, out_dim=out_dim, **extra)


def tokens_and_mask(b: int = 3, length: int = 5, d: int = 8, n_real: tuple[int, ...] = (5, 3, 1)):
    tokens = torch.randn(b, length, d)
    mask = torch.arange(length)[None, :] < torch.tensor(n_real)[:, None]  # (B, L) right padding
    return tokens, mask


# ---------------------------------------------------------------- shapes and call convention


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_output_shape_and_type(kind: str) -> None:
    cfg = make_config(kind)
    adapter = build_adapter(cfg)
    assert isinstance(adapter, ADAPTERS[kind]) and isinstance(adapter, Adapter)
    out = adapter(torch.randn(4, cfg.in_dim))
    assert out.shape == (4, cfg.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_every_adapter_accepts_token_kwargs(kind: str) -> None:
    cfg = make_config(kind)
    adapter = build_adapter(cfg)
    tokens, mask = tokens_and_mask(d=cfg.in_dim)
    out = adapter(torch.randn(3, cfg.in_dim), text_tokens=tokens, text_token_mask=mask, image_tokens=None)
    assert out.shape == (3, cfg.out_dim)


def test_prior_token_dim_differs_from_pooled_dim() -> None:
    prior = build_adapter(make_config("prior", in_dim=8, out_dim=6, token_dim=5))
    tokens, mask = tokens_and_mask(d=5)
    assert prior(torch.randn(3, 8), text_tokens=tokens, text_token_mask=mask).shape == (3, 6)


def test_identity_returns_input_and_has_no_parameters() -> None:
    x = torch.randn(4, 8)
    adapter = build_adapter(make_config("identity"))
    assert adapter(x) is x
    assert not list(adapter.parameters())


def test_mlp_alpha_zero_is_the_identity_and_alpha_weights_the_branches() -> None:
    x = torch.randn(4, 8)
    assert torch.equal(MLPAdapter(8, 8, alpha=0.0)(x), x)
    mlp = MLPAdapter(8, 6, ratio=2, alpha=0.3)
    assert mlp.mlp[0].out_features == 4
    expected = 0.3 * mlp.mlp(x) + 0.7 * mlp.proj(x)
    torch.testing.assert_close(mlp(x), expected)


# ---------------------------------------------------------------- prior transformer masking


@pytest.mark.parametrize("causal", [True, False])
def test_prior_ignores_padded_token_values(causal: bool) -> None:
    prior = build_adapter(make_config("prior", causal=causal)).eval()
    text = torch.randn(3, 8)
    tokens, mask = tokens_and_mask()
    out = prior(text, text_tokens=tokens, text_token_mask=mask)
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 100.0
    changed[2, -1] = float("nan")  # even NaN padding must not leak
    assert torch.equal(prior(text, text_tokens=changed, text_token_mask=mask), out)


def test_prior_gives_nan_padding_zero_gradient() -> None:
    """As token_cs_divergence does: padding may hold NaN, and no NaN reaches a gradient."""
    prior = build_adapter(make_config("prior"))
    tokens, mask = tokens_and_mask()
    tokens[~mask] = float("nan")
    tokens.requires_grad_()
    prior(torch.randn(3, 8), text_tokens=tokens, text_token_mask=mask).square().sum().backward()
    assert tokens.grad is not None and torch.equal(tokens.grad[~mask], torch.zeros_like(tokens.grad[~mask]))
    assert torch.isfinite(tokens.grad).all() and tokens.grad[mask].abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prior.parameters())


@pytest.mark.parametrize("causal", [True, False])
def test_prior_padding_matches_unpadded_sequence(causal: bool) -> None:
    # Checks that the mask is applied in attention, not only to the token values.
    prior = build_adapter(make_config("prior", causal=causal)).eval()
    text, tokens = torch.randn(1, 8), torch.randn(1, 3, 8)
    padded = torch.cat([tokens, torch.randn(1, 4, 8)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    torch.testing.assert_close(
        prior(text, text_tokens=padded, text_token_mask=mask), prior(text, text_tokens=tokens), atol=1e-6, rtol=1e-5
    )


def test_prior_real_tokens_change_the_output() -> None:
    prior = build_adapter(make_config("prior")).eval()
    text = torch.randn(3, 8)
    tokens, mask = tokens_and_mask()
    out = prior(text, text_tokens=tokens, text_token_mask=mask)
    changed = tokens.clone()
    changed[0, 0] += 1.0  # a real token of sample 0
    new = prior(text, text_tokens=changed, text_token_mask=mask)
    assert not torch.allclose(new[0], out[0])
    assert torch.equal(new[1:], out[1:])  # other samples are untouched
    assert not torch.allclose(prior(text), out)  # tokens matter at all


def test_prior_sample_with_no_real_token_is_finite() -> None:
    prior = build_adapter(make_config("prior"))
    tokens, mask = tokens_and_mask(n_real=(0, 2, 5))
    assert torch.isfinite(prior(torch.randn(3, 8), text_tokens=tokens, text_token_mask=mask)).all()


def test_prior_rejects_bad_inputs() -> None:
    prior = build_adapter(make_config("prior"))
    text = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        prior(torch.randn(3, 7))
    with pytest.raises(ValueError, match="max_text_tokens=8"):
        prior(text, text_tokens=torch.randn(3, 9, 8))
    with pytest.raises(ValueError, match="text_token_mask"):
        prior(text, text_tokens=torch.randn(3, 4, 8), text_token_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="without text_tokens"):
        prior(text, text_token_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_tokens must have shape"):
        prior(text, text_tokens=torch.randn(2, 4, 8))


def test_prior_takes_the_token_masks_the_loss_takes_and_refuses_the_same_others() -> None:
    """The prior read an int mask of 2 as True and refused a float 0/1 mask that CSAlignerLoss's token term takes."""
    prior = build_adapter(make_config("prior")).eval()
    text = torch.randn(3, 8)
    tokens, mask = tokens_and_mask()
    ref = prior(text, text_tokens=tokens, text_token_mask=mask)
    for same in (mask.long(), mask.float()):  # a Hugging Face attention mask, or one cast to float
        torch.testing.assert_close(prior(text, text_tokens=tokens, text_token_mask=same), ref)
    with pytest.raises(ValueError, match="only 0 and 1"):
        prior(text, text_tokens=tokens, text_token_mask=mask.long() * 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        prior(text, text_tokens=tokens, text_token_mask=mask.float() * 0.5)
    with pytest.raises(TypeError, match=r"text_token_mask must be a torch.Tensor .*torch.as_tensor"):
        prior(text, text_tokens=tokens, text_token_mask=mask.tolist())


def test_prior_paper_sizes_are_the_defaults() -> None:
    cfg = AdapterConfig(kind="prior", in_dim=768, out_dim=1280)
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.inner_dim, cfg.dropout) == (10, 16, 32, 512, 0.0)
    assert cfg.num_learned_tokens == 3
    with torch.device("meta"):
        prior = build_adapter(cfg)
    assert isinstance(prior, PriorTransformerAdapter)
    assert len(prior.blocks) == 10 and prior.proj_out.out_features == 1280
    assert not any("time" in name for name, _ in prior.named_parameters())


# ---------------------------------------------------------------- determinism and training


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear"])
def test_same_seed_gives_same_adapter(kind: str) -> None:
    cfg = make_config(kind)
    torch.manual_seed(123)
    a = build_adapter(cfg)
    torch.manual_seed(123)
    b = build_adapter(cfg)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    x = torch.randn(4, cfg.in_dim)
    assert torch.equal(a(x), b(x))
    torch.manual_seed(7)
    assert not torch.equal(build_adapter(cfg)(x), a(x))


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear"])
def test_adamw_steps_reduce_mse_on_toy_regression(kind: str) -> None:
    cfg = make_config(kind)
    adapter = build_adapter(cfg)
    x = torch.randn(32, cfg.in_dim)
    y = x @ torch.randn(cfg.in_dim, cfg.out_dim) / cfg.in_dim**0.5  # (32, out) linear target
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(adapter(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_save_load_round_trip_gives_identical_outputs(kind: str, tmp_path) -> None:
    cfg = make_config(kind)
    adapter = build_adapter(cfg).eval()
    path = save_adapter(adapter, cfg, tmp_path / "sub" / "adapter.safetensors")
    loaded, loaded_cfg = load_adapter(path, expected_config=cfg)
    assert loaded_cfg == cfg and type(loaded) is type(adapter)
    x = torch.randn(4, cfg.in_dim)
    tokens, mask = tokens_and_mask(b=4, n_real=(5, 3, 1, 2), d=cfg.in_dim)
    assert torch.equal(
        loaded.eval()(x, text_tokens=tokens, text_token_mask=mask), adapter(x, text_tokens=tokens, text_token_mask=mask)
    )
    assert read_adapter_config(path) == cfg


@pytest.mark.parametrize(("kind", "field"), [("mlp", "mlp_alpha"), ("prior", "dropout")])
def test_a_numpy_float32_setting_is_refused_before_training_not_at_save(kind: str, field: str, tmp_path) -> None:
    """np.float32 is no Python float: json.dumps of the config fails. It was refused on construction; the
    bool check let it through, so a run trained to the end and then failed to save its adapter."""
    import numpy as np

    with pytest.raises(ValueError, match=rf"{field} must be .*got np\.float32\(0\.25\).*float\("):
        make_config(kind, **{field: np.float32(0.25)})
    cfg = make_config(kind, **{field: np.float64(0.25)})  # a float subclass: JSON writes it
    loaded = read_adapter_config(save_adapter(build_adapter(cfg), cfg, tmp_path / "a.safetensors"))
    assert getattr(loaded, field) == 0.25


def test_saved_adapter_has_the_umask_mode(tmp_path, known_umask: int) -> None:
    # safetensors writes 0600; an adapter shared on a cluster must be readable as the umask allows
    cfg = make_config("mlp")
    path = save_adapter(build_adapter(cfg), cfg, tmp_path / "a.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~known_umask


def test_round_trip_keeps_low_precision_dtype(tmp_path) -> None:
    cfg = make_config("linear")
    adapter = build_adapter(cfg).to(torch.bfloat16)
    loaded, _ = load_adapter(save_adapter(adapter, cfg, tmp_path / "a.safetensors"))
    assert loaded.linear.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.linear.weight, adapter.linear.weight)


def test_saved_file_holds_json_config_not_pickle(tmp_path) -> None:
    cfg = make_config("mlp")
    path = save_adapter(build_adapter(cfg), cfg, tmp_path / "a.safetensors")
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["config"]) == dataclasses.asdict(cfg)


def test_load_missing_file_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nope.safetensors")


def test_load_rejects_config_mismatch(tmp_path) -> None:
    cfg = make_config("mlp")
    path = save_adapter(build_adapter(cfg), cfg, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="mlp_ratio: file 4 vs expected 2"):
        load_adapter(path, expected_config=dataclasses.replace(cfg, mlp_ratio=2))


def test_load_rejects_weights_that_do_not_match_the_stored_config(tmp_path) -> None:
    cfg = make_config("linear")
    meta = {"format": "csaligner.adapter", "format_version": "1", "config": json.dumps(cfg.to_dict())}
    path = tmp_path / "a.safetensors"
    save_file({"linear.weight": torch.zeros(3, 8), "linear.bias": torch.zeros(3)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="do not match its config"):
        load_adapter(path)


def test_load_rejects_plain_safetensors_and_garbage(tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a csaligner adapter file"):
        load_adapter(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(garbage)


def test_save_rejects_module_that_does_not_match_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="module does not match config"):
        save_adapter(LinearAdapter(8, 5), make_config("linear"), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# ---------------------------------------------------------------- config and registry


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"in_dim": 0}, "in_dim"),
        ({"out_dim": -3}, "out_dim"),
        ({"in_dim": True}, "in_dim"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"kind": "mlp", "mlp_ratio": 9}, "mlp_ratio"),  # 8 // 9: no hidden unit
        ({"mlp_alpha": 1.5}, "mlp_alpha"),
        ({"mlp_alpha": float("nan")}, "mlp_alpha"),
        ({"mlp_alpha": True}, "mlp_alpha"),  # read as alpha 1.0 (the input dropped); YAML `mlp_alpha: true`
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": False}, "dropout"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_heads": 2.5}, "num_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"num_learned_tokens": 0}, "num_learned_tokens"),
        ({"token_dim": 0}, "token_dim"),
        ({"kind": "identity", "out_dim": 6}, "in_dim == out_dim"),
    ],
)
def test_bad_config_values_raise(overrides: dict[str, object], field: str) -> None:
    base = {"kind": "prior", "in_dim": 8, "out_dim": 8}
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        AdapterConfig(**{**base, **overrides})


def test_direct_constructors_validate_like_the_config() -> None:
    with pytest.raises(ValueError, match="mlp_alpha"):
        MLPAdapter(8, 8, alpha=2.0)
    with pytest.raises(ValueError, match="num_heads"):
        PriorTransformerAdapter(8, 8, num_heads=0)
    with pytest.raises(ValueError, match="out_dim"):
        LinearAdapter(8, 0)


def test_unknown_kind_lists_registered_names() -> None:
    with pytest.raises(ValueError, match=r"unknown adapter kind 'lora2'.*'identity', 'linear', 'mlp', 'prior'"):
        AdapterConfig(kind="lora2", in_dim=8, out_dim=8)
    cfg = make_config("linear")
    object.__setattr__(cfg, "kind", "gone")  # e.g. a config built before a kind was unregistered
    with pytest.raises(ValueError, match="unknown adapter kind 'gone'"):
        build_adapter(cfg)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        AdapterConfig.from_dict({**make_config("mlp").to_dict(), "rank": 4})


def test_register_custom_adapter_and_duplicate_name() -> None:
    @register_adapter("test_scale")
    class Scale(Adapter):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.in_dim = self.out_dim = dim
            self.scale = torch.nn.Parameter(torch.full((dim,), 2.0))

        @classmethod
        def from_config(cls, config: AdapterConfig) -> Scale:
            return cls(config.in_dim)

        def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
            return x * self.scale

    try:
        adapter = build_adapter(AdapterConfig(kind="test_scale", in_dim=4, out_dim=4))
        assert torch.equal(adapter(torch.ones(2, 4)), torch.full((2, 4), 2.0))
        with pytest.raises(ValueError, match="already registered"):
            register_adapter("mlp")(Scale)
        with pytest.raises(TypeError, match="Adapter subclass"):
            register_adapter("not_a_module")(int)
    finally:
        ADAPTERS.pop("test_scale", None)


# ---------------------------------------------------------------- which settings a kind takes

# A valid value other than the default for every kind-specific field.
OTHER_VALUE = {
    "bias": False,
    "mlp_ratio": 2,
    "mlp_alpha": 0.5,
    "num_layers": 1,
    "num_heads": 4,
    "head_dim": 2,
    "dropout": 0.1,
    "num_learned_tokens": 2,
    "max_text_tokens": 6,
    "token_dim": 5,
    "causal": False,
}


def _built(cfg: AdapterConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, object], str]:
    """What a config changes in the adapter it builds: weight shapes, scalar settings, module tree."""
    module = build_adapter(cfg)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return shapes, serialization._settings(module), repr(module)


def _unchecked(config: AdapterConfig, name: str, value: object) -> AdapterConfig:
    """`config` with one field changed past validation: what a config refused now would have built."""
    changed = copy.copy(config)
    object.__setattr__(changed, name, value)
    return changed


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_declared_settings_are_exactly_the_fields_a_kind_reads(kind: str) -> None:
    """A declared setting changes the adapter built; any other field changes nothing (refusing it is right)."""
    takes = kind_settings(kind)
    assert takes is not None and set(takes) <= set(OTHER_VALUE)
    config = make_config(kind)
    base = _built(config)
    for name, value in OTHER_VALUE.items():
        changed = _built(_unchecked(config, name, value))
        assert (changed != base) == (name in takes), f"{kind}: {name}"


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_a_config_refuses_a_value_its_kind_ignores(kind: str) -> None:
    """Built directly, a config took mlp_ratio=8 for a linear adapter and built the same linear layer."""
    takes = kind_settings(kind)
    assert takes is not None
    for name, value in OTHER_VALUE.items():
        if name in takes:
            assert getattr(make_config(kind, **{name: value}), name) == value
            continue
        with pytest.raises(ValueError) as err:
            make_config(kind, **{name: value})
        assert str(err.value).startswith(f"{name}={value!r} (used by kind"), str(err.value)
        assert f"does not apply to kind={kind!r}" in str(err.value) and "remove it" in str(err.value)


def test_a_config_names_every_value_its_kind_ignores() -> None:
    with pytest.raises(ValueError) as err:
        AdapterConfig("linear", 8, 6, bias=False, mlp_ratio=8, causal=False)
    assert str(err.value).startswith(
        "mlp_ratio=8 (used by kind 'mlp'), causal=False (used by kind 'prior') do not apply to kind='linear', "
        "which takes only bias besides kind, in_dim, out_dim: remove them or choose a kind that uses them"
    )


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_a_default_value_is_not_a_setting(kind: str) -> None:
    """The dataclass cannot tell a default from a given value: a field at its default builds any kind."""
    defaults = {f.name: f.default for f in dataclasses.fields(AdapterConfig) if f.name in OTHER_VALUE}
    config = make_config(kind, **{**defaults, **(TINY_PRIOR if kind == "prior" else {})})
    assert config == make_config(kind)
    assert make_config(kind, dropout=0, mlp_alpha=0.2, bias=1).dropout == 0  # equal to the default: not set


def test_a_kind_of_your_own_keeps_its_settings_on_direct_construction() -> None:
    """A kind that declares no settings takes every field; one that declares them is held to them."""

    @register_adapter("test_open_direct")
    class Open(LinearAdapter):
        settings = None

    @register_adapter("test_scaled_direct")
    class Scaled(LinearAdapter):
        settings = ("bias", "mlp_alpha")

    class Inheriting(LinearAdapter):  # reads dropout, but inherits LinearAdapter.settings = ("bias",)
        pass

    register_adapter("test_inheriting_direct")(Inheriting)
    try:
        assert AdapterConfig("test_open_direct", 4, 4, mlp_ratio=2, num_layers=1).num_layers == 1
        assert AdapterConfig("test_scaled_direct", 4, 4, mlp_alpha=0.5).mlp_alpha == 0.5
        with pytest.raises(ValueError, match=r"^num_layers=1 .*to kind='test_scaled_direct', which takes only bias"):
            AdapterConfig("test_scaled_direct", 4, 4, num_layers=1)
        with pytest.raises(ValueError, match=r"dropout=0\.1 .*Inheriting is your class: list every setting"):
            AdapterConfig("test_inheriting_direct", 4, 4, dropout=0.1)
    finally:
        for kind in ("test_open_direct", "test_scaled_direct", "test_inheriting_direct"):
            ADAPTERS.pop(kind, None)


def test_a_config_subclass_compares_with_its_own_defaults() -> None:
    """A subclass that changes a default does not make that default a setting of every kind."""

    @dataclasses.dataclass(frozen=True)
    class WideConfig(AdapterConfig):
        mlp_ratio: int = 2

    assert WideConfig("linear", 8, 6).mlp_ratio == 2
    with pytest.raises(ValueError, match=r"^mlp_ratio=4 \(used by kind 'mlp'\) does not apply to kind='linear'"):
        WideConfig("linear", 8, 6, mlp_ratio=4)


@pytest.mark.parametrize("widths", [(8, 8), (8, 6)], ids=["equal", "unequal"])
@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_unused_settings_are_exactly_the_declared_ones_the_widths_make_no_difference_to(
    kind: str, widths: tuple[int, int]
) -> None:
    """mlp's bias goes only on its side projection, the identity when in_dim == out_dim: any value builds the
    same adapter there, so the kind declares it unused (and a config refuses it); elsewhere it is read."""
    in_dim, out_dim = widths
    config = make_config(kind, in_dim=in_dim, out_dim=out_dim)
    unused = ADAPTERS[kind].unused_settings(config.in_dim, config.out_dim)
    base = _built(config)
    for name in kind_settings(kind) or ():
        with pytest.MonkeyPatch.context() as mp:  # the constructor's own check would refuse what we build
            mp.setattr(ADAPTERS[kind], "unused_settings", classmethod(lambda cls, i, o: {}))
            changed = _built(_unchecked(config, name, OTHER_VALUE[name]))
        assert (changed == base) == (name in unused), f"{kind} {widths}: {name}"
    assert set(unused) == ({"bias"} if (kind, widths) == ("mlp", (8, 8)) else set())


def test_a_bias_setting_for_an_mlp_of_equal_widths_is_refused() -> None:
    message = (
        "bias=False does not apply to kind='mlp' with in_dim=8, out_dim=8: its only place, the side projection, is "
        "the identity when the widths are equal (and the MLP branch has no bias), so the adapter has no bias either "
        "way; remove it"
    )
    with pytest.raises(ValueError) as err:
        AdapterConfig("mlp", 8, 8, bias=False)
    assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^bias=False does not apply to kind='mlp' with in_dim=8, out_dim=8"):
        MLPAdapter(8, 8, bias=False)
    assert AdapterConfig("mlp", 8, 8).bias and not AdapterConfig("mlp", 8, 6, bias=False).bias
    assert "proj.bias" not in MLPAdapter(8, 6, bias=False).state_dict()  # read when the widths differ
    with pytest.raises(ValueError, match=r"^model\.text\.bias=True does not apply to kind='mlp' with in_dim=8"):
        check_settings_apply("mlp", ["kind", "bias"], where="model.text", values={"bias": True}, widths=(8, 8))
    check_settings_apply("mlp", ["kind", "bias"], where="model.text", widths=(8, 6))
    check_settings_apply("mlp", ["kind", "bias"], where="model.text")  # widths unknown: nothing to say yet


def test_an_mlp_file_of_equal_widths_saved_with_bias_false_still_loads(tmp_path) -> None:
    """Earlier versions took bias=False for an 8 -> 8 mlp (and built it without a bias, as with bias=True)."""
    config = AdapterConfig("mlp", 8, 8)
    module = build_adapter(config)
    meta = {
        "format": "csaligner.adapter",
        "format_version": "1",
        "config": json.dumps({**config.to_dict(), "bias": False}),
    }
    path = tmp_path / "old.safetensors"
    save_file(dict(module.state_dict()), str(path), metadata=meta)
    loaded, stored = load_adapter(path)
    assert stored == config
    assert torch.equal(loaded(torch.ones(2, 8)), module(torch.ones(2, 8)))


def test_an_adapter_file_saved_with_a_value_its_kind_ignores_still_loads(tmp_path) -> None:
    """Earlier versions saved whatever a kind ignored (e.g. a run's model.text: {kind: linear, mlp_ratio: 8})."""
    config = make_config("linear")
    module = build_adapter(config)
    meta = {
        "format": "csaligner.adapter",
        "format_version": "1",
        "config": json.dumps({**config.to_dict(), "mlp_ratio": 8, "causal": False}),
    }
    path = tmp_path / "old.safetensors"
    save_file(dict(module.state_dict()), str(path), metadata=meta)
    with pytest.raises(ValueError, match="mlp_ratio=8"):
        AdapterConfig.from_dict(json.loads(meta["config"]))  # a mapping given by a person is still checked
    loaded, stored = load_adapter(path)
    assert stored == config  # the ignored values read as the defaults: the same adapter
    assert torch.equal(loaded(torch.ones(2, 8)), module(torch.ones(2, 8)))
    newer = {**meta, "config": json.dumps({**config.to_dict(), "rank": 4})}
    save_file(dict(module.state_dict()), str(path), metadata=newer)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):  # an unknown field is still an error
        read_adapter_config(path)


def test_settings_a_kind_ignores_are_named_with_the_kinds_that_use_them() -> None:
    with pytest.raises(ValueError) as err:
        check_settings_apply("linear", ["kind", "in_dim", "bias", "mlp_ratio"], where="model.text")
    assert str(err.value).startswith(
        "model.text.mlp_ratio (used by kind 'mlp') does not apply to kind='linear', which takes only bias"
    )
    with pytest.raises(ValueError) as err:
        check_settings_apply("identity", ["bias", "causal"], where="model.image")
    assert str(err.value).startswith(
        "model.image.bias (used by kinds 'linear', 'mlp'), model.image.causal (used by kind 'prior') do not apply "
        "to kind='identity', which takes no settings besides kind, in_dim, out_dim"
    )
    check_settings_apply("mlp", ["kind", "in_dim", "out_dim", "bias", "mlp_ratio", "mlp_alpha"])
    check_settings_apply("prior", ["token_dim", "causal", "num_layers"])


def test_a_kind_that_declares_no_settings_accepts_every_field() -> None:
    @register_adapter("test_open")
    class Open(Adapter):
        @classmethod
        def from_config(cls, config: AdapterConfig) -> Open:
            return cls()

    try:
        assert kind_settings("test_open") is None
        check_settings_apply("test_open", ["mlp_ratio", "num_layers"])
    finally:
        ADAPTERS.pop("test_open", None)


def test_the_mlp_ratio_default_does_not_refuse_narrow_kinds_that_ignore_it() -> None:
    # in_dim // 4 == 0 only matters for the mlp's hidden layer; a 2-d linear or identity adapter has none
    assert build_adapter(AdapterConfig(kind="linear", in_dim=2, out_dim=3)).out_dim == 3
    assert LinearAdapter(3, 2).in_dim == 3 and IdentityAdapter(2).out_dim == 2
    with pytest.raises(ValueError, match="mlp_ratio=4 leaves no hidden unit for in_dim=2"):
        AdapterConfig(kind="mlp", in_dim=2, out_dim=3)


def test_builtin_classes_are_registered() -> None:
    assert ADAPTERS["prior"] is PriorTransformerAdapter and ADAPTERS["mlp"] is MLPAdapter
    assert ADAPTERS["linear"] is LinearAdapter and ADAPTERS["identity"] is IdentityAdapter


@pytest.mark.parametrize(
    ("module", "config", "named"),
    [
        (MLPAdapter(8, 8, alpha=0.5), AdapterConfig(kind="mlp", in_dim=8, out_dim=8), "alpha: 0.5 vs 0.2"),
        (  # the same weight shapes, split into other heads
            PriorTransformerAdapter(8, 6, num_layers=1, num_heads=4, head_dim=2, max_text_tokens=8),
            make_config("prior", num_layers=1, num_heads=2, head_dim=4),
            "blocks.0.num_heads: 4 vs 2",
        ),
        (
            PriorTransformerAdapter(8, 6, causal=False, **TINY_PRIOR),  # type: ignore[arg-type]
            make_config("prior"),
            "causal: False vs True",
        ),
    ],
)
def test_save_rejects_settings_the_weights_do_not_show(
    module: Adapter, config: AdapterConfig, named: str, tmp_path
) -> None:
    """Settings outside the state dict would be replaced by the config's on load: another function."""
    with pytest.raises(ValueError, match=f"module does not match config.*{named}"):
        save_adapter(module, config, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_save_ignores_attributes_a_module_adds_for_itself(tmp_path) -> None:
    config = AdapterConfig(kind="mlp", in_dim=8, out_dim=8)
    module = build_adapter(config)
    module.calls = 3  # e.g. a counter a user's subclass keeps: not a setting the config builds
    save_adapter(module, config, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").is_file()


class Doubled(MLPAdapter):
    """A user's subclass of a registered adapter: same weights, another forward."""

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return 2 * super().forward(x, **kwargs)


def test_an_unregistered_subclass_is_refused_with_how_to_register_it(tmp_path) -> None:
    """Saved as "mlp" it would load as a plain MLPAdapter and silently lose its forward."""
    config = AdapterConfig(kind="mlp", in_dim=8, out_dim=6)
    want = (
        r"module is a Doubled, but load_adapter rebuilds kind 'mlp' as MLPAdapter; Doubled subclasses MLPAdapter "
        r"but is not registered.*@register_adapter\('my_kind'\) on class Doubled.*replace\(config, kind='my_kind'\)"
    )
    with pytest.raises(ValueError, match=want):
        save_adapter(Doubled.from_config(config), config, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_registered_subclass_saves_and_loads_as_itself(tmp_path) -> None:
    register_adapter("test_doubled")(Doubled)
    try:
        config = AdapterConfig(kind="mlp", in_dim=8, out_dim=6)
        module = Doubled.from_config(config).eval()
        with pytest.raises(ValueError, match=r"registered as kind 'test_doubled': save it with .*kind='test_doubled'"):
            save_adapter(module, config, tmp_path / "a.safetensors")
        own = dataclasses.replace(config, kind="test_doubled")
        loaded, _ = load_adapter(save_adapter(module, own, tmp_path / "a.safetensors"))
        x = torch.randn(3, 8)
        assert type(loaded) is Doubled and torch.equal(loaded.eval()(x), module(x))
    finally:
        ADAPTERS.pop("test_doubled", None)


def test_saving_the_same_adapter_twice_gives_identical_bytes(tmp_path) -> None:
    # safetensors keeps metadata in a Rust HashMap with a fresh random seed per map, so the header's key
    # order (format, format_version, config) varied from one save to the next, even in one process.
    cfg = make_config("mlp")
    adapter = build_adapter(cfg)
    files = [save_adapter(adapter, cfg, tmp_path / f"a{i}.safetensors").read_bytes() for i in range(8)]
    assert all(f == files[0] for f in files[1:])
    assert read_adapter_config(tmp_path / "a7.safetensors") == cfg
