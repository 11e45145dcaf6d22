"""WSGI entry point for gunicorn:

    gunicorn --workers 1 --threads 8 --timeout 0 -b 127.0.0.1:9090 ml_backend._wsgi:app

One worker holds the models once; threads serve concurrent clicks (the click model is shared,
per-image states are cached). ``--timeout 0`` because building a reference bank on the first
click of a project may take longer than gunicorn's default 30 s. ``gunicorn.conf.py`` (read from
the folder gunicorn starts in) sets the worker class ``ml_backend.server.BufferingThreadWorker``,
which reads each request whole before a thread takes it (slow clients cannot take the threads).

Environment variables
---------------------
LABEL_STUDIO_URL          Label Studio base URL the backend can reach (http://host:port). Needed to
                          download task images and to read OK-tagged reference tasks. Falls back to
                          the hostname Label Studio sends to /setup.
LABEL_STUDIO_API_KEY      API token (legacy token, or a personal access token) of a user who can see
                          the projects. Falls back to the token Label Studio sends to /setup.
ADCLICK_MODEL_DIR         Where per-project data live: <dir>/project-<id>-<ts>/ holds the reference bank
                          (bank.*), the ADClick-Seg checkpoints (seg-<version>.pt, written atomically)
                          and seg_current.json (the serving one; found again after a restart), and
                          the adapted click models (click-<version>.pt, click_current.json)
                          (default ~/.adclick/models).
ADCLICK_CHECKPOINT        Click model checkpoint (default: the one shipped in adclick_core).
ADCLICK_DEVICE            auto | cpu | cuda | cuda:N (default auto: CUDA when present).
ADCLICK_REFERENCE_DIR     Optional folder of defect-free images added to every project's bank.
ADCLICK_MAX_REFERENCES    At most this many reference images per project (default 200).
ADCLICK_STATE_CACHE_MB    Memory budget of the per-image state cache (default 512).
ADCLICK_IMAGE_CACHE_MB    Disk budget of downloaded images (default 1024).
ADCLICK_IMAGE_CACHE_DIR   Where downloaded images are cached, in a folder only this user can read, each
                          file checked against its SHA-256 on every read (default
                          $XDG_CACHE_HOME or ~/.cache, then adclick/images).
ADCLICK_MASK_THRESHOLD    Probability above which a pixel is in the mask (default 0.5).
ADCLICK_BANK_WAIT_S       How long a click waits for a project's first bank build (default 80;
                          Label Studio gives /predict 100 s).
ADCLICK_BANK_REFRESH_S    Re-read OK-tagged tasks at most this often, in the background (default 600;
                          webhooks add new OK tags at once).
ADCLICK_SEG_ITERATIONS    Iterations of an ADClick-Seg training (Start Training; default 600).
ADCLICK_SEG_THRESHOLD     Pre-annotation: probability above which a pixel is in a defect type's mask,
                          and image score at which the verdict is NG (default: the threshold each
                          trained model calibrated on its training labels, best pixel F1).
ADCLICK_TRAIN_EVERY       Also start a training after every N new annotations (default 0 = only on
                          Start Training). One training per project at a time.
ADCLICK_ADAPT_MIN_REFERENCES
                          Adapt the click model to a project once its reference bank holds this many
                          images, and again each time they have doubled (default 50; 0 = only on
                          POST /adapt). Written as <project dir>/click-<version>.pt + click_current.json.
ADCLICK_ADAPT_ITERATIONS  Fine-tuning iterations of one adaptation (default 300).
ADCLICK_DOWNLOAD_TIMEOUT  Seconds per image download (default 30).
BASIC_AUTH_USER           With BASIC_AUTH_PASS: HTTP Basic credentials every endpoint wants (Label
BASIC_AUTH_PASS           Studio: Connect Model > Use authentication); /health without credentials
                          answers only {"status": "UP"}. Unset (default): no authentication.
ADCLICK_ALLOWED_HOSTS     Image hosts besides Label Studio the backend may download from: comma-
                          separated names, *.example.com for a domain, * for every public host.
                          Loopback/private/link-local addresses only when listed by name (default:
                          none; Label Studio's own cloud-storage redirects to public hosts are allowed).
ADCLICK_MAX_REQUEST_MB    Largest request body (default 20; 413 above).
ADCLICK_MAX_IMAGE_MB      Largest image download or data: URL (default 50; 413 above).
ADCLICK_MAX_IMAGE_PIXELS  Largest image in pixels (default 50e6; 413 above, before decoding).
ADCLICK_MAX_CLICKS        Most KeyPoints in one interactive request (default 100).
ADCLICK_MAX_IMAGE_SIDE    Longest image side in pixels (default 30000; 413 above, before decoding).
ADCLICK_MAX_IMAGE_ASPECT  Longest side / shortest side of an image (default 20; 413 above).
ADCLICK_MAX_TASKS         Most tasks in one /predict (default 1000).
ADCLICK_MAX_REQUEST_PIXELS
                          Pixels one request may decode, all its images together (default twice
                          ADCLICK_MAX_IMAGE_PIXELS; 413 above).
ADCLICK_REQUEST_DEADLINE  Seconds of work one request may take; checked between tasks and before an
                          image's features (default 120; 503 after it).
ADCLICK_REQUEST_READ_TIMEOUT
                          Seconds a client has to send a whole request from its first byte, and for
                          each blocking write of an answer (default 60; the connection is closed).
ADCLICK_READ_BUFFER_MB    Memory for requests still arriving, all connections together (default 4 x
                          ADCLICK_MAX_REQUEST_MB; 503 above).
ADCLICK_MAX_PROJECTS      Projects held in memory; the least recently used idle one leaves when a new
                          one needs room (default 100; 503 when all are busy). Files stay on disk.
ADCLICK_PROJECT_IDLE_S    A project unused this long leaves memory (default 3600).
ADCLICK_MAX_DISK_MB       Budget of ADCLICK_MODEL_DIR: above it no bank is saved and no training or
                          adaptation starts (default 20000; 507 with the reason).
REDIS_URL                 redis://host:6379/0 (or REDIS_HOST / REDIS_PORT): trainings and adaptations
                          become jobs on the Redis queue RQ_QUEUE_NAME (default adclick), run by
                          `adclick worker` on any machine that sees ADCLICK_MODEL_DIR (ml_backend/queue.py).
                          Unset (default): they run in a thread of this process.
ADCLICK_PRELOAD           1 (default) loads the click model at start in the background; 0 on first use.
ADCLICK_LOG_LEVEL         DEBUG | INFO (default) | WARNING.
"""
from __future__ import annotations

import logging
import os
import threading

from .api import create_app
from .model import Backend

logging.basicConfig(
    level=getattr(logging, os.environ.get("ADCLICK_LOG_LEVEL", "INFO").upper(), logging.INFO),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
logging.getLogger("urllib3").setLevel(logging.WARNING)

backend = Backend()
app = create_app(backend)

if os.environ.get("ADCLICK_PRELOAD", "1") not in ("0", "false", "no"):
    threading.Thread(target=backend.preload, name="adclick-preload", daemon=True).start()
