"""Web console: server-rendered HTML shells plus small vanilla JS, a client of the user API.

`router` is mounted by server.app.create_app(). The pages carry no data of their own: each
page's script fetches what that page shows from /api/v1 with the `sly_session` cookie that
POST /api/v1/session sets at sign-in. No build step, no CDN; static files are served from
this package by a whitelist (so nothing outside `static/` can be asked for).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.convertors import Convertor, register_url_convertor

from protocol.states import TaskState
from protocol.tasks import TASK_TYPES

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "sly_session"
TASK_STATES = tuple(s.value for s in TaskState)

_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
# relative path -> (bytes, content type); read once at import, so a request never touches the
# filesystem. vendor/ holds third-party files copied by vendor.sh (uPlot); LICENSE and README stay unserved.
_STATIC = {
    p.relative_to(HERE / "static").as_posix(): (p.read_bytes(), _STATIC_TYPES[p.suffix])
    for p in sorted((HERE / "static").rglob("*"))
    if p.is_file() and p.suffix in _STATIC_TYPES
}
# Scripts a page with charts loads before its own.
CHART_SCRIPTS = ("vendor/uplot/uPlot.iife.min.js", "charts.js")

router = APIRouter(include_in_schema=False)


class _PagePath(Convertor):
    """Any path the console may be asked for by a person: not the APIs' (they answer JSON 404s and
    405s of their own) nor a static file's."""

    regex = r"(?!api/|agent/|console/static/).*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("console_page", _PagePath())

# Scripts and styles only from this server: no inline script can run and no style attribute is
# applied (the scripts set styles through CSSOM, which the policy allows; uPlot does the same and
# needs no eval). No framing (clickjacking the token form).
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def _html(template: str, scripts: tuple[str, ...] = (), status_code: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(
        _env.get_template(template).render(task_types=TASK_TYPES, task_states=TASK_STATES, scripts=scripts, **ctx),
        status_code=status_code,
        headers=SECURITY_HEADERS,
    )


def _page(request: Request, template: str, title: str, nav: str, *scripts: str, **ctx) -> Response:
    """Render a page shell; without a session cookie, go to sign-in first (the API checks validity),
    which comes back to this page (`next`: its path and query)."""
    if SESSION_COOKIE not in request.cookies:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/signin?next={quote(here, safe='')}", status_code=303)
    return _html(template, scripts=scripts, title=title, nav=nav, **ctx)


@router.get("/")
def index(request: Request):
    return RedirectResponse("/nodes" if SESSION_COOKIE in request.cookies else "/signin", status_code=303)


@router.get("/signin")
def signin():
    return _html("signin.html", ("signin.js",), title="Sign in", nav="")


@router.get("/nodes")
def nodes(request: Request):
    return _page(request, "nodes.html", "Nodes", "nodes", "nodes.js")


@router.get("/nodes/{agent_id:int}")
def node(request: Request, agent_id: int):
    return _page(request, "node.html", f"Node {agent_id}", "nodes", *CHART_SCRIPTS, "node.js", agent_id=agent_id)


@router.get("/tasks")
def tasks(request: Request):
    return _page(request, "tasks.html", "Tasks", "tasks", "tasks.js")


@router.get("/tasks/{task_id:int}")
def task(request: Request, task_id: int):
    return _page(request, "task.html", f"Task {task_id}", "tasks", *CHART_SCRIPTS, "task.js", task_id=task_id)


@router.get("/projects")
def projects(request: Request):
    return _page(request, "collection.html", "Projects", "projects", "collection.js", kind="projects")


@router.get("/models")
def models(request: Request):
    return _page(request, "collection.html", "Models", "models", "collection.js", kind="models")


@router.get("/projects/{project_id:int}")
def project(request: Request, project_id: int):
    return _page(
        request,
        "project.html",
        f"Project {project_id}",
        "projects",
        "annotations.js",
        "project.js",
        project_id=project_id,
    )


@router.get("/models/{model_id:int}")
def model(request: Request, model_id: int):
    return _page(request, "model.html", f"Model {model_id}", "models", "model.js", model_id=model_id)


@router.get("/files")
def files(request: Request):
    """The team files browser; the folder is in the query (`/files?path=/a/b/`), read by files.js."""
    return _page(request, "files.html", "Team files", "files", "files.js")


@router.get("/favicon.ico")
def favicon():
    body, ctype = _STATIC["favicon.ico"]
    return Response(body, media_type=ctype, headers={"cache-control": "max-age=86400"})


@router.get("/console/static/{name:path}")
def static(name: str):
    if name not in _STATIC:
        return Response(status_code=404)
    body, ctype = _STATIC[name]
    return Response(body, media_type=ctype, headers={"cache-control": "max-age=300"})


# Last: a page path that no route above knows is a 404 page, not the API's JSON.
@router.get("/{path:console_page}")
def not_found(request: Request, path: str):
    nav = "" if SESSION_COOKIE not in request.cookies else "none"
    return _html("notfound.html", title="Not found", nav=nav, status_code=404, path="/" + path)
