"""The FastAPI gateway: `service.app.create_app`, one module per feature.

`settings` (the one settings class), `deps` (Annotated dependencies), `errors` (the one error
model), `generations` (the job API), `openai_compat` (`/v1/images/generations`), `system`
(models, probes, metrics), `jobs` (the logic the routes share), `metrics` (the gateway's series).
"""
