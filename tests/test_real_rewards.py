"""Tests of the real reward models (CLIP score, PickScore, LAION aesthetic) on a tiny random CLIP built
offline from a config, and of the remote reward client against the reference server and failing servers."""

from __future__ import annotations

import json
import math
import socket
import string
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from critic_align.rewards import (
    Boldness,
    CLIPScore,
    FunctionReward,
    JpegCompressibility,
    LaionAesthetic,
    MultiReward,
    PickScore,
    RemoteReward,
    RewardError,
)
from critic_align.rewards.clip import (
    AESTHETIC_HEAD_KEYS,
    AestheticHead,
    CLIPImageTransform,
    convert_aesthetic_head,
)
from critic_align.rewards.remote import decode_images, encode_images
from critic_align.rewards.remote_server import main as server_main
from critic_align.rewards.remote_server import make_server

transformers = pytest.importorskip("transformers")

IMAGE_SIZE = 24  # the tiny CLIP's input resolution
PROJ_DIM = 16
REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# a tiny CLIP, saved like a hub checkpoint


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "ca", "cat</w>"]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")], model_max_length=16)


def tiny_processor(**kwargs):
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5 without torchvision
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    kwargs.setdefault("size", {"shortest_edge": IMAGE_SIZE})
    kwargs.setdefault("crop_size", {"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Processor(**kwargs)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=PROJ_DIM,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(37.0))  # a value distinct from the default init
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The saved model, processor and tokenizer loaded independently of the rewards."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    return model, tiny_processor(), AutoTokenizer.from_pretrained(clip_dir)


def quantised_samples(b, c, h, w, seed=0):
    """Samples in [-1, 1] that are exactly u8 / 255 * 2 - 1, with the uint8 images they come from."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    return u8.float() / 255 * 2 - 1, u8


def smooth_u8(b, h, w, seed=0):
    """Smooth random RGB images (resampling filters differ most on pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 4, 4, generator=g)
    return (F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True) * 255).round().to(torch.uint8)


def to_pil(u8):
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in u8]


def hand_embeddings(reference, u8, prompts):
    """Normalised image/text embeddings with the processor on PIL images and the model's own feature methods."""
    model, processor, tok = reference

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        pixels = processor(to_pil(u8), return_tensors="pt")["pixel_values"]
        img = feats(model.get_image_features(pixel_values=pixels))
        t = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        txt = feats(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


PROMPTS = ["a cat", "cat", "a cat", "zebra", "dog days"]

# ---------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("hw", [(64, 48), (17, 33), (12, 12), (100, 70), (24, 24)])
def test_transform_matches_processor_on_pil(hw):
    processor = tiny_processor()
    transform = CLIPImageTransform.from_processor(processor)
    u8 = smooth_u8(3, *hw)
    ours = transform(u8.float() / 255)
    ref = processor(to_pil(u8), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # PIL rounds to uint8 after resizing (1/255/std ~ 0.015 in normalised units)
    assert (ours - ref).abs().max() < 0.04
    assert (ours - ref).abs().mean() < 0.01
    if hw == (IMAGE_SIZE, IMAGE_SIZE):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_transform_noise_downsampling_and_fixed_size_processor():
    u8 = torch.randint(0, 256, (2, 3, 50, 61), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for processor in (tiny_processor(), tiny_processor(size={"height": 20, "width": 30}, do_center_crop=False,
                                                         resample=2)):
        transform = CLIPImageTransform.from_processor(processor)
        ours = transform(u8.float() / 255)
        ref = processor(to_pil(u8), return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape
        # PIL resamples in two uint8 passes (rounded and clamped in between): a few levels on pixel noise
        assert (ours - ref).abs().max() < 0.06
        assert (ours - ref).abs().mean() < 0.01
    assert transform.output_size(50, 61) == (20, 30)


def test_transform_rules_and_errors():
    t = CLIPImageTransform(8, (8, 8), [0.5], [0.5])
    assert t._resized(16, 32) == (8, 16) and t._resized(30, 10) == (24, 8)
    assert t._resized(11, 17) == (8, int(8 * 17 / 11))
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(t(x), (x - 0.5) / 0.5)  # no resize needed, full crop: just normalised
    with pytest.raises(ValueError, match="larger than the resized image"):
        CLIPImageTransform((6, 6), (8, 8), [0.5], [0.5])(x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        t(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="resample"):
        CLIPImageTransform(8, None, [0.5], [0.5], resample="lanczos")
    with pytest.raises(ValueError, match="std must be positive"):
        CLIPImageTransform(8, None, [0.5], [0.0])

# ---------------------------------------------------------------------------------------------
# CLIP score / PickScore / aesthetic


def test_loading_is_lazy_and_errors_only_on_first_call(clip_dir, tmp_path):
    reward = CLIPScore(clip_dir)
    assert not reward.is_loaded and reward._model is None and reward._tokenizer is None
    x, _ = quantised_samples(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    reward(x, ["a", "b"])
    assert reward.is_loaded
    missing = CLIPScore(tmp_path / "no_such_model")  # constructing never touches the path
    assert not missing.is_loaded
    with pytest.raises(RewardError, match="does not exist") as info:
        missing(x, ["a", "b"])
    assert "no_such_model" in str(info.value)


def test_clear_errors_for_missing_paths_and_unreachable_hub(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*local directory"):
        CLIPScore("./models/clip-vit-large").load()
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        CLIPScore(tmp_path / "weights.bin").load()
    with pytest.raises(ValueError, match="could not load the CLIP model from the local directory"):
        CLIPScore(tmp_path).load()  # exists but holds no model
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="pass a local path") as info:
        CLIPScore("someone/clip-that-is-not-cached", local_files_only=True).load()
    assert "someone/clip-that-is-not-cached" in str(info.value)
    assert time.perf_counter() - t0 < 10
    head = tmp_path / "head.safetensors"
    with pytest.raises(FileNotFoundError, match="aesthetic head file"):
        LaionAesthetic(head, model=clip_dir).load()


def test_clip_score_matches_hand_computation(clip_dir, reference):
    x, u8 = quantised_samples(5, 3, IMAGE_SIZE, IMAGE_SIZE)
    img, txt = hand_embeddings(reference, u8, PROMPTS)
    cos = (img * txt).sum(-1)
    got = CLIPScore(clip_dir)(x, PROMPTS)
    assert got.shape == (5,) and got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, cos, atol=1e-5, rtol=1e-5)
    assert cos.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(CLIPScore(clip_dir, scale=100)(x, PROMPTS), 100 * cos, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(CLIPScore(clip_dir, scale=100, clip_at_zero=True)(x, PROMPTS),
                               100 * cos.clamp_min(0), atol=1e-3, rtol=1e-5)


def test_clip_score_resizes_like_the_processor(clip_dir, reference):
    u8 = smooth_u8(3, 40, 32, seed=2)
    x = u8.float() / 255 * 2 - 1
    img, txt = hand_embeddings(reference, u8, PROMPTS[:3])
    torch.testing.assert_close(CLIPScore(clip_dir)(x, PROMPTS[:3]), (img * txt).sum(-1), atol=2e-2, rtol=0)


def test_pickscore_is_logit_scale_times_cosine(clip_dir, reference):
    x, u8 = quantised_samples(5, 3, IMAGE_SIZE, IMAGE_SIZE, seed=3)
    img, txt = hand_embeddings(reference, u8, PROMPTS)
    got = PickScore(clip_dir)(x, PROMPTS)
    torch.testing.assert_close(got, 37.0 * (img * txt).sum(-1), atol=1e-4, rtol=1e-5)


def test_chunking_grayscale_and_repeated_prompts(clip_dir):
    x, _ = quantised_samples(5, 3, IMAGE_SIZE, IMAGE_SIZE, seed=4)
    whole = CLIPScore(clip_dir)(x, PROMPTS)
    chunked = CLIPScore(clip_dir, batch_size=2)(x, PROMPTS)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    gray = x[:, :1]
    torch.testing.assert_close(CLIPScore(clip_dir)(gray, PROMPTS), CLIPScore(clip_dir)(gray.expand(-1, 3, -1, -1), PROMPTS))
    reward = CLIPScore(clip_dir)
    with pytest.raises(RewardError, match=r"C = 1 \(grayscale\) or 3"):
        reward(torch.zeros(2, 2, 8, 8), ["a", "b"])
    with pytest.raises(RewardError, match="non-finite"):
        reward(torch.full((1, 3, 8, 8), math.nan), ["a"])
    with pytest.raises(RewardError, match="2 prompts for 1 samples"):
        reward(x[:1], ["a", "b"])


def test_differentiable_option_and_bf16(clip_dir):
    x, _ = quantised_samples(2, 3, 30, 30, seed=5)
    plain = CLIPScore(clip_dir)(x.requires_grad_(True), ["a cat", "zebra"])
    assert not plain.requires_grad
    reward = CLIPScore(clip_dir, differentiable=True)
    out = reward(x, ["a cat", "zebra"])
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.model.parameters())
    half = CLIPScore(clip_dir, dtype="bfloat16")(x.detach(), ["a cat", "zebra"])
    assert half.dtype == torch.float32 and next(CLIPScore(clip_dir, dtype="bf16").model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(half, out.detach(), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        CLIPScore(clip_dir, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScore(clip_dir, batch_size=0)


def write_head(path, input_size=PROJ_DIM, seed=0, extra=None, drop=None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dims = [input_size, 1024, 128, 64, 16, 1]
    state = {}
    for idx, (i, o) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        state[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    state.update(extra or {})
    for k in drop or []:
        del state[k]
    save_file(state, str(path))
    return state


def test_aesthetic_matches_hand_computation(clip_dir, reference, tmp_path):
    state = write_head(tmp_path / "head.safetensors")
    assert sorted(state) == sorted(AESTHETIC_HEAD_KEYS)
    x, u8 = quantised_samples(4, 3, IMAGE_SIZE, IMAGE_SIZE, seed=6)
    img, _ = hand_embeddings(reference, u8, ["x"] * 4)
    h = img.double()
    for idx in (0, 2, 4, 6, 7):  # no activations, dropout is the identity in eval mode
        h = h @ state[f"layers.{idx}.weight"].double().T + state[f"layers.{idx}.bias"].double()
    reward = LaionAesthetic(tmp_path / "head.safetensors", model=clip_dir)
    assert not reward.is_loaded
    got = reward(x, ["ignored"] * 4)
    torch.testing.assert_close(got, h.squeeze(-1).float(), atol=1e-4, rtol=1e-4)
    assert got.std() > 0


def test_aesthetic_head_layout_errors_and_conversion(clip_dir, tmp_path):
    # the layer layout of the original MLP (state dict keys and shapes)
    head = AestheticHead(768)
    assert sorted(head.state_dict()) == sorted(AESTHETIC_HEAD_KEYS)
    assert tuple(head.state_dict()["layers.0.weight"].shape) == (1024, 768)
    assert tuple(head.state_dict()["layers.7.weight"].shape) == (1, 16)
    bad = tmp_path / "bad.safetensors"
    write_head(bad, drop=["layers.7.bias"], extra={"layers.8.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \['layers.7.bias'\], unexpected \['layers.8.weight'\]"):
        AestheticHead.from_safetensors(bad)
    wide = tmp_path / "wide.safetensors"
    write_head(wide, input_size=768)
    with pytest.raises(RewardError, match="takes 768-d embeddings but the CLIP model .* produces 16-d"):
        LaionAesthetic(wide, model=clip_dir)(torch.zeros(1, 3, 8, 8), ["a"])
    # the original .pth (a plain state dict) converts to safetensors and loads
    original = AestheticHead(PROJ_DIM)
    torch.save(original.state_dict(), tmp_path / "orig.pth")
    out = convert_aesthetic_head(tmp_path / "orig.pth", tmp_path / "converted.safetensors")
    loaded = AestheticHead.from_safetensors(out)
    e = F.normalize(torch.randn(3, PROJ_DIM), dim=-1)
    torch.testing.assert_close(loaded(e), original.eval()(e))
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the aesthetic MLP"):
        convert_aesthetic_head(tmp_path / "other.pth", tmp_path / "x.safetensors")


def test_registry_builds_real_rewards(clip_dir, tmp_path):
    from critic_align.train.registry import build_rewards

    write_head(tmp_path / "head.safetensors")
    multi = build_rewards([
        {"name": "clip_score", "model": str(clip_dir), "scale": 100},
        {"name": "pickscore", "model": str(clip_dir), "batch_size": 2, "weight": 0.5},
        {"name": "aesthetic", "model": str(clip_dir), "head": str(tmp_path / "head.safetensors")},
        {"name": "jpeg_compressibility"},
    ])
    assert multi.names == ("clip_score", "pickscore", "aesthetic", "jpeg_compressibility")
    x, _ = quantised_samples(3, 3, 20, 28, seed=7)
    matrix = multi(x, ["a cat", "cat", "zebra"])
    assert matrix.shape == (3, 4) and bool(torch.isfinite(matrix).all())
    remote = build_rewards([{"name": "remote", "url": "http://127.0.0.1:9/", "timeout": 2, "retries": 0}])
    assert isinstance(remote.rewards[0], RemoteReward) and remote.rewards[0].timeout == 2.0


# ---------------------------------------------------------------------------------------------
# remote reward: the reference server and failing servers


@contextmanager
def running(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/score"
    finally:
        server.shutdown()
        server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


def fake_server(respond):
    """A server whose POST handler is ``respond(body_dict) -> (status, bytes)``; counts requests."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(body)
            status, payload = respond(body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = _Server(("127.0.0.1", 0), Handler)
    return server, calls


def fast(url, **kwargs):
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("backoff", 0.001)
    return RemoteReward(url, **kwargs)


def test_encode_decode_round_trip():
    x, u8 = quantised_samples(3, 3, 5, 7)
    torch.testing.assert_close(decode_images(encode_images(x, "png"), "png", [3, 3, 5, 7]), x, atol=1e-6, rtol=0)
    g, _ = quantised_samples(2, 1, 4, 4)
    torch.testing.assert_close(decode_images(encode_images(g, "png"), "png", [2, 1, 4, 4]), g, atol=1e-6, rtol=0)
    raw = torch.randn(2, 3, 4, 4) * 1.5
    assert torch.equal(decode_images(encode_images(raw, "list"), "list", [2, 3, 4, 4]), raw)
    with pytest.raises(ValueError, match="image 0: RGB 5x7, expected L 5x7"):
        decode_images(encode_images(x[:1], "png"), "png", [1, 1, 5, 7])
    with pytest.raises(ValueError, match="not a base64-encoded PNG"):
        decode_images(["@@@"], "png", [1, 3, 5, 7])
    with pytest.raises(ValueError, match="list of B = 2 images"):
        decode_images(encode_images(x[:1], "png"), "png", [2, 3, 5, 7])


def test_remote_reward_against_reference_server():
    x, _ = quantised_samples(5, 3, 16, 16, seed=8)
    x[0] = 1.0  # a flat image, much smaller as JPEG
    prompts = [f"p{i}" for i in range(5)]
    jpeg = JpegCompressibility()
    with running(make_server(jpeg, 0)) as url:
        for batch_size in (None, 2):
            got = fast(url, batch_size=batch_size)(x, prompts)
            assert torch.equal(got, jpeg(x, prompts))  # PNG is lossless on the uint8 image the reward sees
        assert got[0] > got[1:].max()
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as r:
            assert json.loads(r.read()) == {"reward": "jpeg_compressibility", "protocol": 1}
    bold = Boldness()
    with running(make_server(bold, 0)) as url:
        raw = torch.randn(3, 1, 8, 8) * 0.5
        torch.testing.assert_close(fast(url, encoding="list")(raw, ["a"] * 3), bold(raw, ["a"] * 3), atol=1e-7, rtol=0)


def test_reference_server_reports_bad_requests_and_reward_failures():
    def broken(x, p):
        raise RuntimeError("detector crashed")

    nan_reward = FunctionReward(lambda x, p: torch.tensor([math.nan, 1.0]), name="sometimes", allows_nan=True)
    with running(make_server(FunctionReward(broken, name="detector"), 0)) as url:
        with pytest.raises(RewardError, match=r"HTTP 500.*reward 'detector' failed: RuntimeError: detector crashed") as info:
            fast(url, retries=0)(torch.zeros(2, 3, 4, 4), ["a", "b"])
        assert url in str(info.value)
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=b'{"encoding": "png"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(req, timeout=5)
        assert http.value.code == 400 and "lacks" in json.loads(http.value.read())["error"]
    with running(make_server(nan_reward, 0)) as url:
        got = fast(url, allows_nan=True, name="sometimes")(torch.zeros(2, 3, 4, 4), ["a", "b"])
        assert math.isnan(got[0]) and got[1] == 1.0
        with pytest.raises(RewardError, match="NaN"):
            fast(url)(torch.zeros(2, 3, 4, 4), ["a", "b"])


def test_slow_server_times_out_with_the_url_named():
    def slow(body):
        time.sleep(1.0)
        return 200, json.dumps({"scores": [0.0]}).encode()

    server, calls = fake_server(slow)
    with running(server) as url:
        t0 = time.perf_counter()
        with pytest.raises(RewardError, match=r"no answer within the timeout of 0.2 s \(gave up after 2 attempts\)") as info:
            fast(url, timeout=0.2, retries=1)(torch.zeros(1, 3, 4, 4), ["a"])
        assert url in str(info.value)
        assert time.perf_counter() - t0 < 1.5  # two 0.2 s timeouts, not two 1 s answers
    assert len(calls) == 2


@pytest.mark.parametrize(
    "status, payload, retried, message",
    [
        (500, b'{"error": "out of GPU memory"}', True, r"HTTP 500 .*: out of GPU memory \(gave up after 3 attempts\)"),
        (503, b"maintenance", True, r"HTTP 503 .*b'maintenance'"),
        (400, b'{"error": "prompts missing"}', False, r"HTTP 400 .*: prompts missing"),
        (200, b"<html>not json</html>", False, r"not valid JSON .*<html>"),
        (200, b'{"values": [1, 2, 3]}', False, r"a JSON object with a 'scores' list"),
        (200, b'{"scores": [1.0, 2.0]}', False, r"returned 2 scores for 3 samples"),
        (200, b'{"scores": [1.0, "high", 2.0]}', False, r"score 1 is 'high'"),
    ],
)
def test_failing_server_gives_a_clear_error(status, payload, retried, message):
    server, calls = fake_server(lambda body: (status, payload))
    with running(server) as url:
        with pytest.raises(RewardError, match=message) as info:
            fast(url, retries=2)(torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
        assert url in str(info.value) and "'remote'" in str(info.value)
    assert len(calls) == (3 if retried else 1)
    assert calls[0]["shape"] == [3, 3, 4, 4] and calls[0]["prompts"] == ["a", "b", "c"]


def test_server_recovering_within_the_retries_is_fine():
    answers = iter([(503, b"{}"), (503, b"{}"), (200, b'{"scores": [0.5, 1.5]}')])
    server, calls = fake_server(lambda body: next(answers))
    with running(server) as url:
        assert fast(url, retries=2)(torch.zeros(2, 1, 4, 4), ["a", "b"]).tolist() == [0.5, 1.5]
    assert len(calls) == 3


def test_server_down_fails_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"could not connect .*is the reward server running.*after 3 attempts") as info:
        fast(url, retries=2, backoff=0.01)(torch.zeros(1, 3, 4, 4), ["a"])
    assert url in str(info.value)
    assert 0.03 <= time.perf_counter() - t0 < 5  # slept 0.01 + 0.02 between the attempts


def test_remote_reward_argument_checks():
    with pytest.raises(ValueError, match="http:// or https://"):
        RemoteReward("localhost:8000")
    with pytest.raises(ValueError, match="encoding"):
        RemoteReward("http://127.0.0.1:1", encoding="jpeg")
    with pytest.raises(ValueError, match="timeout"):
        RemoteReward("http://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="retries"):
        RemoteReward("http://127.0.0.1:1", retries=-1)
    with pytest.raises(TypeError, match="make_server needs a Reward"):
        make_server(lambda x, p: x, 0)
    a, b = RemoteReward("http://127.0.0.1:1", name="geneval"), RemoteReward("http://127.0.0.1:2", name="ocr")
    assert MultiReward([a, b]).names == ("geneval", "ocr")


def test_reference_server_command_line(capsys):
    proc = subprocess.Popen(
        [sys.executable, "-m", "critic_align.rewards.remote_server", "--port", "0", "--reward", "jpeg_compressibility",
         "--reward-kwargs", '{"quality": 80}'],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'jpeg_compressibility' at http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split(" at ")[1].split(" ")[0]
        x, _ = quantised_samples(2, 3, 8, 8, seed=9)
        got = fast(url)(x, ["a", "b"])
        assert torch.equal(got, JpegCompressibility(quality=80)(x, ["a", "b"]))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    for argv, message in [
        (["--port", "0", "--reward", "nope"], "unknown reward 'nope'"),
        (["--port", "0", "--reward", "boldness", "--reward-kwargs", "[1]"], "must be a JSON object"),
        (["--port", "0", "--reward", "jpeg_compressibility", "--reward-kwargs", '{"quality": 0}'], "quality"),
        (["--port", "0", "--reward", "remote", "--reward-kwargs", '{"url": "http://127.0.0.1:1"}'], "forward"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            server_main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_remote_samples_are_checked_before_sending():
    reward = RemoteReward("http://127.0.0.1:1", retries=0)
    with pytest.raises(RewardError, match="non-finite"):
        reward(torch.full((1, 3, 4, 4), math.inf), ["a"])
    with pytest.raises(RewardError, match="C = 1 or 3"):
        reward(torch.zeros(1, 4, 4, 4), ["a"])
