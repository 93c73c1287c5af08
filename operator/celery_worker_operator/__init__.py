"""celery-worker-operator: runs Celery worker pools the way Celery's operations guide says."""

__version__ = "0.1.0"
