import msgpack
import numpy as np
import pytest
import torch

from federation.codec import CodecError, check_against_spec, decode_tensors, encode_tensors, spec_of


def sample_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": rng.standard_normal((2, 4)).astype(np.float64),
    }


def test_round_trip_keeps_names_order_dtypes_and_values() -> None:
    state = sample_state()
    decoded = decode_tensors(encode_tensors(state))
    assert list(decoded) == list(state)
    for name, array in state.items():
        assert decoded[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded[name], array)


def test_torch_state_dict_round_trip() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    decoded = decode_tensors(encode_tensors(model.state_dict()))
    assert list(decoded) == list(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in decoded.items()})


def test_wire_is_raw_bytes_not_float_lists() -> None:
    state = {"w": np.ones(1000, dtype=np.float32)}
    data = encode_tensors(state)
    assert len(data) < 4000 + 100  # 4 bytes a float, plus a small header
    message = msgpack.unpackb(data)
    assert isinstance(message["tensors"][0][3], bytes)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(codec="other"),
        lambda m: m.update(v=99),
        lambda m: m["tensors"][0].__setitem__(1, "object"),
        lambda m: m["tensors"][0].__setitem__(2, [5, 5]),
        lambda m: m["tensors"][0].__setitem__(2, [-1]),
        lambda m: m["tensors"][0].__setitem__(3, b"short"),
        lambda m: m["tensors"].append(list(m["tensors"][0])),
    ],
)
def test_malformed_messages_raise_codec_error(mutate) -> None:  # type: ignore[no-untyped-def]
    message = msgpack.unpackb(encode_tensors({"w": np.zeros(4, np.float32)}))
    mutate(message)
    with pytest.raises(CodecError):
        decode_tensors(msgpack.packb(message))


def test_garbage_and_oversize() -> None:
    with pytest.raises(CodecError):
        decode_tensors(b"\xc1\x00garbage")
    with pytest.raises(CodecError, match="exceeds"):
        decode_tensors(encode_tensors({"w": np.zeros(100, np.float32)}), max_bytes=10)


def test_spec_check_rejects_wrong_shape_names_and_nan() -> None:
    state = sample_state()
    spec = spec_of(state)
    check_against_spec(decode_tensors(encode_tensors(state)), spec)
    wrong = dict(state, **{"conv.bias": np.zeros(5, np.float32)})
    with pytest.raises(CodecError, match=r"conv\.bias"):
        check_against_spec(wrong, spec)
    with pytest.raises(CodecError, match="missing"):
        check_against_spec({k: v for k, v in state.items() if k != "fc.weight"}, spec)
    bad = dict(state)
    bad["conv.bias"] = state["conv.bias"].copy()
    bad["conv.bias"][0] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        check_against_spec(bad, spec)


def test_huge_declared_shape_is_a_codec_error_not_a_crash() -> None:
    message = msgpack.unpackb(encode_tensors({"w": np.zeros(0, np.float32)}))
    # [2**63, 0] has 0 elements, so the byte count (0) matches: numpy would then refuse the
    # dimension with its own ValueError; [True, 0] is a bool posing as an int.
    for shape in ([2**62, 4], [2**64 - 1], [2**63, 0], [0, 2**40], [True, 0], [False]):
        message["tensors"][0][2] = shape
        with pytest.raises(CodecError):
            decode_tensors(msgpack.packb(message))
