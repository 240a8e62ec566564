"""Offline jobs over HTTP (`/v1/jobs`, shaped like OpenAI's fine-tuning jobs): store.py keeps jobs and
their events in SQLite, arguments.py checks a job's arguments with the command's own parser and
confines its paths, runner.py runs each job as a subprocess in its own process group under per-device
limits, client.py is `leanserve jobs ...`. The routes are server/routes/jobs.py."""
