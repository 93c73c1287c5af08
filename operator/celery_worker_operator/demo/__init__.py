"""`celery-worker-operator demo`: the bundled Celery app (`app`), its pool (`pool.yaml`) and the
run that scales it live (`run`)."""
