"""celery-worker-operator: runs Celery worker pools the way Celery's operations guide says."""

from celery_worker_operator.instrument import instrument as instrument

__version__ = "0.1.0"
