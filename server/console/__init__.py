"""Web console (owned by the console work). `router` is mounted by server.app.create_app()."""
from fastapi import APIRouter

router = APIRouter()
