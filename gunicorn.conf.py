# gunicorn reads this file from the folder it is started in (the repository root, /app in the
# Docker image). Command-line options and GUNICORN_CMD_ARGS override it.
#
# One worker holds the models once; its threads serve concurrent clicks. The worker class reads
# each request whole before a thread takes it, so slow clients cannot take the threads
# (ml_backend/server.py; ADCLICK_REQUEST_READ_TIMEOUT, ADCLICK_READ_BUFFER_MB).
worker_class = "ml_backend.server.BufferingThreadWorker"
workers = 1
threads = 8
timeout = 0  # trainings run in threads of the worker; the arbiter must not kill it mid-training
worker_connections = 256
keepalive = 5
