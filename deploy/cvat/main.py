"""Nuclio handler of the CVAT detector function `maskrcnn` (function.yaml beside it): it forwards CVAT's
request body ({"image": base64, "threshold": t}) to `maskrcnn serve`'s POST /cvat/detect and returns its
answer. Only the standard library: the function's image needs no model, torch or GPU.

MASKRCNN_URL (function.yaml's env) is the server's address as seen from the nuclio container.
"""

import json
import os
import urllib.error
import urllib.request


def init_context(context):
    context.user_data.url = os.environ.get("MASKRCNN_URL", "http://maskrcnn:8000").rstrip("/") + "/cvat/detect"


def handler(context, event):
    body = event.body if isinstance(event.body, bytes) else json.dumps(event.body).encode()
    request = urllib.request.Request(context.user_data.url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=110) as reply:
            status, answer = reply.status, reply.read()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read()
    except urllib.error.URLError as e:
        status, answer = 502, json.dumps({"detail": f"maskrcnn serve at {context.user_data.url}: {e.reason}"}).encode()
    return context.Response(body=answer, headers={}, content_type="application/json", status_code=status)
