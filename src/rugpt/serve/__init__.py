"""`rugpt serve`: an OpenAI-compatible generation server with a batching scheduler, limits and a web playground.

    from rugpt.serve import ServerSettings, create_app
    app = create_app(ServerSettings(model="small", max_batch=16))   # run with uvicorn, or `rugpt serve`
"""

from rugpt.serve.app import create_app, run_server
from rugpt.serve.scheduler import BatchScheduler
from rugpt.serve.service import GenerationService
from rugpt.serve.settings import ServerSettings

__all__ = ["BatchScheduler", "GenerationService", "ServerSettings", "create_app", "run_server"]
