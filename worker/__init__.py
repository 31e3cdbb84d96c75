"""The Celery worker (generate task, micro-batcher, result store). Built by the Serving issue."""
