from __future__ import annotations

import json

from bgwatch.jobs import JobSpec, MaskSpec, OutputSpec, job_key


def test_spec_round_trips_through_its_stored_json() -> None:
    spec = JobSpec(operation="replace", engine="gradient", gradient=("#000000", "#ffffff"), seed=9,
                   mask=MaskSpec(engine="rembg", model="isnet-general-use"), output=OutputSpec(format="webp"))
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec


def test_the_key_follows_the_pixels_not_the_control_fields() -> None:
    base = JobSpec()
    assert job_key("abc", base) == job_key("abc", JobSpec(reprocess=True, require_sidecar=True))
    assert job_key("abc", base) != job_key("abc", JobSpec(mode="color"))
    assert job_key("abc", base) != job_key("abd", base)
