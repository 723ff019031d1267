"""The HTTP API served by the daemon: a real uvicorn on loopback, driven by httpx, on the same pipeline as
the folders (the classical mask engine: no weights needed)."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bgwatch.config import parse_config
from bgwatch.errors import ConfigError
from bgwatch.metrics import Metrics
from bgwatch.samples import write_samples
from tests.apihelpers import ApiDaemon, api_config, folder_output, pixels, post, rows, sample_bytes
from tests.helpers import files_under, wait_for

# ---------------------------------------------------------------- same images as a folder job


# The tiny ONNX net through rembg: the classical engine's grabCut draws from OpenCV's process-wide RNG, so
# two runs of one image may differ by a few levels at the outline.
TINY_MASK = {"mask": {"engine": "rembg", "model": "tiny.onnx"}}


def test_cleanup_equals_a_folder_job_and_wait_false_gives_a_run_to_poll(tmp_path: Path, u2net_home: Path) -> None:
    rules = {"operation": "cleanup", "mode": "color", "background_color": "#00ff00", "enhance_fg": True}
    config = api_config(tmp_path, {"shop": {"rules": rules}}, metrics={"listen": ""}, defaults=TINY_MASK)
    image = sample_bytes(tmp_path, 5)
    with ApiDaemon(config, metrics=Metrics()) as api:
        (config.inboxes[0].path / "photo.jpg").write_bytes(image)
        expected = pixels(folder_output(config))

        answer = post(api.client, "cleanup", image, mode="color", background_color="#00ff00")  # enhance_fg: true
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "success" and body["download_url"] == f"/download/{body['filename']}"
        assert body["success"] is True and body["message"] == "Background cleanup completed successfully"
        assert Path(body["output_path"]) == config.state_dir.resolve() / "http" / "results" / body["filename"]
        got = api.client.get(body["download_url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert np.array_equal(pixels(got.content), expected)

        queued = post(api.client, "cleanup", image, wait=False, mode="color", background_color="#00ff00")
        assert queued.status_code == 202 and queued.headers["location"] == f"/runs/{queued.json()['run_id']}"
        record = wait_for(lambda: (r := api.client.get(queued.headers["location"]).json())["status"] == "done" and r)
        assert record["timings"]["encode"] >= 0 and record["filename"] == "photo.jpg"
        assert np.array_equal(pixels(api.client.get(record["download_url"]).content), expected)

        health = api.client.get("/health").json()
        assert health["status"] == "healthy" and health["version"]
        assert "rembg:tiny.onnx:fp32" in health["engines_loaded"], "the mask engine with its precision"
        assert "queue_depth" in health and health["configured_device"] == config.device
        assert health["engine"] == "SDXL" and health["device"] in ("cuda", "cpu")
        schema = api.client.get("/openapi.json").json()
        form = schema["paths"]["/background/replace"]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert form["schema"]["properties"]["steps"]["maximum"] == 100
        assert api.client.get("/docs").status_code == 200
        assert api.client.get("/redoc").status_code == 200
        scraped = api.client.get("/metrics").content
        assert b"bgwatch_runs_total" in scraped and b"bgwatch_http_waiting 0.0" in scraped
        assert b'bgwatch_http_connections_closed_total{reason="evicted"} 0.0' in scraped
        assert api.client.get(f"/runs/{rows(config, str(config.inboxes[0].path))[0]['id']}").status_code == 404
    http_rows = rows(config, "http")
    assert [r["status"] for r in http_rows] == ["done", "done"] and http_rows[0]["rel_path"] == "photo.jpg"
    assert not any((config.state_dir / "http" / "uploads").iterdir()), "uploads are removed when their run ends"


def test_replace_with_a_gradient_equals_a_folder_job(tmp_path: Path, u2net_home: Path) -> None:
    rules = {"operation": "replace", "engine": "gradient", "gradient": ["#102030", "#e0d0c0"], "shadow": True,
             "enhance_fg": True, "output": {"format": "jpg"}}
    config = api_config(tmp_path, {"shop": {"rules": rules}}, defaults=TINY_MASK)
    image = sample_bytes(tmp_path, 7)
    with ApiDaemon(config) as api:
        (config.inboxes[0].path / "photo.jpg").write_bytes(image)
        expected = pixels(folder_output(config))
        answer = post(api.client, "replace", image, engine="gradient", gradient="#102030,#e0d0c0", shadow="true",
                      format="jpg")
        assert answer.status_code == 200, answer.text
        got = api.client.get(answer.json()["download_url"])
        assert got.headers["content-type"] == "image/jpeg"
        assert np.array_equal(pixels(got.content), expected)


# ---------------------------------------------------------------- refusals, as the original service's


def test_bad_parameters_are_422_with_the_message_a_sidecar_gets(tmp_path: Path) -> None:
    config = api_config(tmp_path, {"shop": {"rules": {"operation": "replace", "engine": "color"}}})
    image = sample_bytes(tmp_path, 9)
    with ApiDaemon(config) as api:
        inbox = config.inboxes[0].path
        (inbox / "photo.yaml").write_text("steps: 0\n")
        (inbox / "photo.jpg").write_bytes(image)
        [row] = wait_for(lambda: [r for r in rows(config, str(inbox)) if r["status"] == "failed"])
        answer = post(api.client, "replace", image, engine="color", steps=0)
        assert answer.status_code == 422
        detail = answer.json()["detail"]
        assert detail == "request: steps: 0 is out of range (allowed: 1 to 100)"
        assert row["error"].endswith(detail.removeprefix("request: ")), "the same one-line message"

        assert post(api.client, "replace", image, engine="sdxl").json()["detail"].startswith(
            "request: prompt: engine sdxl needs a prompt")
        unknown = post(api.client, "cleanup", image, mode="transparent", colour="#fff")
        assert unknown.status_code == 422 and "unknown form field" in unknown.json()["detail"]
        assert post(api.client, "cleanup", image, mode="sepia").status_code == 422
        text = post(api.client, "cleanup", b"hello, not an image", name="notes.jpg")
        assert text.status_code == 422 and text.json()["detail"].startswith("notes.jpg: not an image")
        assert api.client.post("/background/cleanup", data={"mode": "color"}).status_code == 422
    assert rows(config, "http") == [], "refused requests record no run"


def test_over_4k_in_sdxl_mode_and_over_max_pixels_are_413(tmp_path: Path) -> None:
    config = api_config(tmp_path, limits={"max_pixels": 300_000}, http={"max_upload_bytes": 200_000})
    banner, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (4200, 64), (200, 200, 200)).save(banner, "JPEG")
    Image.new("RGB", (640, 480), (200, 200, 200)).save(big, "JPEG")
    with ApiDaemon(config) as api:
        answer = post(api.client, "replace", banner.getvalue(), name="banner.jpg", engine="sdxl", prompt="oak table")
        assert answer.status_code == 413
        assert answer.json()["detail"].startswith("banner.jpg: 4200x64 is over 4096 px")
        assert "ALLOW_4K" in answer.json()["detail"]
        flat = post(api.client, "replace", banner.getvalue(), engine="color")  # not sdxl: taken, and fails later
        assert flat.status_code == 500 and flat.json()["detail"].startswith("classical engine: what stands out")
        record = api.client.get(f"/runs/{flat.json()['run_id']}").json()
        assert record["success"] is False and record["detail"] == flat.json()["detail"]
        pixels_over = post(api.client, "cleanup", big.getvalue(), name="big.jpg")
        assert pixels_over.status_code == 413 and "limits.max_pixels" in pixels_over.json()["detail"]
        upload_over = post(api.client, "cleanup", b"\xff\xd8\xff" + bytes(300_000))
        assert upload_over.status_code == 413 and "http.max_upload_bytes" in upload_over.json()["detail"]
        assert api.daemon.http is not None and api.daemon.http.health()["http_in_flight"] == 0, "places given back"


def test_generation_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    config = api_config(tmp_path, limits={"generations_per_minute": 1}, http={"max_wait": 1})
    image = sample_bytes(tmp_path, 11)
    with ApiDaemon(config) as api:
        assert api.daemon.generation_bucket.try_acquire(), "a folder job took the one token"
        answer = post(api.client, "replace", image, engine="sdxl", prompt="oak table", seed=1)
        assert answer.status_code == 429
        assert int(answer.headers["retry-after"]) > 1 and "http.max_wait" in answer.json()["detail"]
        assert post(api.client, "replace", image, engine="color").status_code == 200, "only generations wait"
    assert [r["status"] for r in rows(config, "http")] == ["done"]


def test_download_serves_only_this_apis_results(tmp_path: Path) -> None:
    config = api_config(tmp_path, http={"keep_hours": 1})
    image = sample_bytes(tmp_path, 13)
    with ApiDaemon(config) as api:
        name = post(api.client, "cleanup", image).json()["filename"]
        results = config.state_dir / "http" / "results"
        (results / "planted.png").symlink_to(config.db_path)
        (config.state_dir / "http" / "secret.png").write_bytes(b"not yours")
        for attempt in ("../../bgwatch.db", "..%2F..%2Fbgwatch.db", "%2e%2e/secret.png", "..%2fsecret.png",
                        "planted.png", "bgwatch.db", ".hidden.png", f"{name}/", "/etc/passwd"):
            assert api.client.get(f"/download/{attempt}").status_code == 404, attempt
        raw = httpx.get(f"{api.daemon.http.url}/download/..%2F..%2Fbgwatch.db")  # type: ignore[union-attr]
        assert raw.status_code == 404
        assert api.client.get(f"/download/{name}").status_code == 200
        long_name = post(api.client, "cleanup", image, name="../" + "é" * 300 + ".jpg").json()
        assert long_name["filename"].startswith("image-") and len(rows(config, "http")[-1]["rel_path"].encode()) <= 200
        assert api.daemon.http is not None and api.daemon.http.prune_results(now=time.time() + 3601) == 2
        assert api.client.get(f"/download/{name}").status_code == 404, "removed after keep_hours"
        api.daemon.request_reload()  # a reload keeps the door (and its address) as they are
        assert post(api.client, "cleanup", image).status_code == 200


def test_beyond_loopback_needs_a_key_and_the_key_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_keys_file"):
        parse_config({"http": {"listen": "0.0.0.0:8089"}}, env={})
    with pytest.raises(ConfigError, match=r"http\.listen"):
        parse_config({"http": {"listen": "8089"}}, env={})
    assert parse_config({"http": {"listen": "[::1]:8089"}}, env={}).http.api_keys_file is None
    keys = tmp_path / "keys.txt"
    keys.write_text("# shop backend\nk-right-0123456789\n")
    config = api_config(tmp_path, http={"listen": "0.0.0.0:0", "api_keys_file": str(keys)})
    image = sample_bytes(tmp_path, 15)
    with ApiDaemon(config, key="k-right-0123456789") as api:
        bare = httpx.Client(base_url=api.client.base_url, timeout=30)
        missing = post(bare, "cleanup", image)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = bare.post("/background/cleanup", files={"file": ("a.jpg", image)},
                          headers={"Authorization": "Bearer k-wrong"})
        assert wrong.status_code == 401
        assert bare.get("/download/x.png", headers={"Authorization": "Bearer k-wrong"}).status_code == 401
        assert bare.get("/health").status_code == 200, "the health check needs no key"
        bare.close()
        assert post(api.client, "cleanup", image).status_code == 200
    assert len(rows(config, "http")) == 1
    assert b"k-right-0123456789" not in config.db_path.read_bytes()


def test_serve_wants_a_listen_address_and_keys_beyond_loopback(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from bgwatch.cli import main

    config = api_config(tmp_path, http={"listen": ""})
    assert config.source is not None
    assert main(["-c", str(config.source), "serve"]) == 2
    assert "http.listen" in capsys.readouterr().err
    assert main(["-c", str(config.source), "serve", "--listen", "0.0.0.0:0"]) == 2
    assert "api_keys_file" in capsys.readouterr().err


def test_serve_runs_the_api_without_inboxes(tmp_path: Path) -> None:
    config = api_config(tmp_path, {"shop": {"rules": {"operation": "cleanup"}}})
    config = replace(config, inboxes=())
    with ApiDaemon(config) as api:
        assert post(api.client, "cleanup", sample_bytes(tmp_path, 17)).status_code == 200


# ---------------------------------------------------------------- load: the HTTP door beside a folder batch


@pytest.mark.slow
def test_fifty_concurrent_uploads_while_a_folder_batch_runs(tmp_path: Path) -> None:
    config = api_config(tmp_path, {"batch": {"rules": {"operation": "cleanup"}}}, http={"window": 8})
    uploads = [p.read_bytes() for p in write_samples(tmp_path / "uploads", 50, size=(96, 96), seed=300)]
    refused: list[int] = []

    def client_job(api: ApiDaemon, index: int) -> int:
        while True:  # a client honouring 503 (a full window) comes back, as the original's clients did on 429
            answer = post(api.client, "cleanup", uploads[index], name=f"u{index}.jpg")
            if answer.status_code != 503:
                assert answer.status_code == 200, answer.text
                return int(answer.json()["run_id"])
            refused.append(index)
            time.sleep(0.05)

    with ApiDaemon(config) as api:
        write_samples(config.inboxes[0].path, 12, size=(256, 256), seed=200)
        with ThreadPoolExecutor(max_workers=50) as pool:
            run_ids = list(pool.map(lambda i: client_job(api, i), range(50)))
        wait_for(lambda: len(files_under(config.inboxes[0].outbox)) == 12, timeout=60)
    assert len(set(run_ids)) == 50
    http_rows = rows(config, "http")
    assert len(http_rows) == 50 and {r["status"] for r in http_rows} == {"done"}
    assert len({r["input_sha256"] for r in http_rows}) == 50, "every upload done exactly once"
    assert sorted(r["rel_path"] for r in http_rows) == sorted(f"u{i}.jpg" for i in range(50))
    folder_rows = rows(config, str(config.inboxes[0].path))
    assert len(folder_rows) == 12 and {r["status"] for r in folder_rows} == {"done"}
    print(f"{len(refused)} answer(s) 503 while the window was full")


@pytest.mark.slow
def test_tiny_sdxl_replace_equals_a_folder_job_then_the_rate_limit_answers_429(tmp_path: Path, tiny_sdxl: Path,
                                                                                 u2net_home: Path) -> None:
    rules = {"operation": "replace", "engine": "sdxl", "prompt": "oak table", "seed": 7, "steps": 2,
             "enhance_fg": True}
    config = api_config(tmp_path, {"gen": {"rules": rules}}, device="cpu", limits={"generations_per_minute": 1},
                        http={"max_wait": 2}, defaults={**TINY_MASK, "model": str(tiny_sdxl)})
    image = sample_bytes(tmp_path, 19, size=(128, 96))
    with ApiDaemon(config) as api:
        (config.inboxes[0].path / "photo.jpg").write_bytes(image)
        expected = pixels(folder_output(config))
        same = post(api.client, "replace", image, prompt="oak table", seed=7, steps=2)  # engine sdxl by default
        assert same.status_code == 200, same.text
        assert same.json()["bg_engine"].startswith("sdxl:"), "from the cache: no token needed"
        assert np.array_equal(pixels(api.client.get(same.json()["download_url"]).content), expected)
        other = post(api.client, "replace", image, prompt="oak table", seed=8, steps=2)
        assert other.status_code == 429 and int(other.headers["retry-after"]) > 2
