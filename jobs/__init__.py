"""Jobs: what the gateway and the workers share, without torch.

The settings, the job record and its state machine, the job store (Redis or memory), the queue
client with the Celery configuration, and worker liveness (heartbeats and the reaper). The gateway
(`service`) and the workers (`worker`) both build on this layer and never on each other.
"""
