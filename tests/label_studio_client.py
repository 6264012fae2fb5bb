"""Label Studio's side of tests/test_label_studio.py, run with the Label Studio virtual environment's Python
(label-studio and label-studio-sdk pin a numpy that the project's environment does not have).

Reads a JSON job on stdin: {"url", "token" (a personal access token), "backend", "projects": [{"title",
"label_config", "uploads": [image paths], "tasks": [task data]}]}. For each project it creates it with
label-studio-sdk, uploads the images and imports the tasks, connects the ML backend, asks Label Studio to
retrieve predictions for every task, and reads the tasks back. Writes JSON on stdout: per project its id,
the backend's state and each task's data and predictions; brush regions also carry their mask as decoded
by label-studio-sdk's own brush decoder (packed bits, base64).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle


def access_token(url: str, token: str) -> str:
    """Exchange a personal access token for an access token (for the multipart upload the SDK lacks)."""
    reply = httpx.post(f"{url}/api/token/refresh", json={"refresh": token}, timeout=30)
    reply.raise_for_status()
    return reply.json()["access"]


def decoded_brush(region: dict) -> str:
    """Return a brush region's mask, decoded by label-studio-sdk, as base64 of its packed bits."""
    rgba = decode_rle(region["value"]["rle"]).reshape(region["original_height"], region["original_width"], 4)
    return base64.b64encode(np.packbits(rgba[..., 3] > 127).tobytes()).decode()


def run_project(client: LabelStudio, job: dict, spec: dict, bearer: str) -> dict:
    """Create, fill, connect and pre-annotate one project; return what Label Studio holds afterwards."""
    project = client.projects.create(title=spec["title"], label_config=spec["label_config"])
    for path in spec["uploads"]:
        with open(path, "rb") as f:
            reply = httpx.post(f"{job['url']}/api/projects/{project.id}/import", files={"file": (Path(path).name, f)},
                               headers={"Authorization": f"Bearer {bearer}"}, timeout=60)
        reply.raise_for_status()
    if spec["tasks"]:
        client.projects.import_tasks(project.id, request=spec["tasks"])
    patient = {"timeout_in_seconds": 1800}  # Label Studio waits for the backend's answers within these calls
    backend = client.ml.create(project=project.id, url=job["backend"], title="maskrcnn", timeout=1800,
                               request_options=patient)
    client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": True, "excluded": []}, request_options=patient)
    tasks = []
    for task in client.tasks.list(project=project.id, fields="all"):
        predictions = []
        for prediction in client.predictions.list(task=task.id):
            result = [dict(region) for region in prediction.result]
            for region in result:
                if region["type"] == "brushlabels":
                    region["decoded_mask"] = decoded_brush(region)
            predictions.append({"result": result, "score": prediction.score,
                                "model_version": prediction.model_version})
        tasks.append({"id": task.id, "data": task.data, "predictions": predictions})
    state = client.ml.get(backend.id)
    return {"id": project.id, "backend_state": str(getattr(state.state, "value", state.state)),
            "backend_error": state.error_message or None,
            "tasks": tasks}


def main() -> None:
    job = json.load(sys.stdin)
    client = LabelStudio(base_url=job["url"], api_key=job["token"])
    bearer = access_token(job["url"], job["token"])
    out = [run_project(client, job, spec, bearer) for spec in job["projects"]]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
