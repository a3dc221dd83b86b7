"""Fixtures for the handler tests: the real server, the real Docker engine, task images built
FROM the local busybox image, and a leased task wrapped in a TestContext."""

from __future__ import annotations

import pytest

from client import UserClient
from node.api import AgentAPI
from node.config import Config
from tests.support.images import build_script_image
from tests.workers.ctx import TestContext

TASK_IMAGE = "sly-test/worker-tasks:latest"

SCRIPTS = {
    # train-like, the legacy plugin way: config files, data/<project>/<ds>/img, model/ at its root;
    # a checkpoint folder per epoch (results/0000000N) announced with an SDK CHECKPOINT line;
    # `train.sh model` also writes results/model/
    "train.sh": r"""#!/bin/sh
set -e
D=/sly_task_data
cmp -s $D/task_config.json $D/task_settings.json
n=$(find $D/data/*/*/img -type f | wc -l)
echo "found $n input files"
i=1
while [ $i -le 3 ]; do
  c=$(printf '%08d' $((i-1)))
  mkdir -p $D/results/$c
  echo "{\"message\": \"progress\", \"event_type\": \"EventType.PROGRESS\"," \
    "\"subtask\": \"Epochs\", \"current\": $i, \"total\": 3}"
  echo "{\"message\": \"metrics\", \"event_type\": \"EventType.METRICS\", \"type\": \"train\", \"epoch\": $i," \
    "\"metrics\": {\"loss\": 0.$i}}"
  cp -r $D/model/. $D/results/$c/
  echo "weights of epoch $i" > $D/results/$c/weights.bin
  echo "{\"message\": \"checkpoint\", \"event_type\": \"EventType.CHECKPOINT\", \"subdir\": \"$c\"," \
    "\"id\": $((i-1)), \"sizeb\": 18, \"best_now\": true," \
    "\"optional\": {\"epoch\": $i, \"val_loss\": 0.$i}}"
  i=$((i+1))
done
mkdir -p $D/results/$(printf '%08d' 3)
echo "a warning on stderr" >&2
if [ "$1" = model ]; then
  mkdir -p $D/results/model
  cat $(find $D/data/*/*/img -type f | sort) | md5sum > $D/results/model/weights.bin
fi
echo '{"message": "training done", "level": "WARN", "accuracy": 0.93}'
""",
    # inference-like: results/<input project name>/ = a copy of the input project
    "infer.sh": r"""#!/bin/sh
set -e
cd /sly_task_data/data/*/
R=/sly_task_data/results/$(basename "$PWD")
mkdir -p "$R"
cp meta.json "$R/"
for ds in */; do
  ds=${ds%/}
  mkdir -p "$R/$ds/img" "$R/$ds/ann"
  cp "$ds"/img/* "$R/$ds/img/"
  cp "$ds"/ann/*.json "$R/$ds/ann/"
done
echo "predicted $(find "$R" -path '*/img/*' -type f | wc -l) items"
echo '{"message": "model applied", "event_type": "EventType.MODEL_APPLIED"}'
""",
    "fail.sh": "#!/bin/sh\necho starting\necho 'something broke' >&2\nexit 3\n",
    "eat.sh": "#!/bin/sh\necho eating\nhead -c 200m /dev/zero | tail > /dev/null\n",
    "forever.sh": "#!/bin/sh\ntrap 'echo got SIGTERM; exit 143' TERM\necho running forever\n"
    "while true; do sleep 0.1; done\n",
    "count.sh": "#!/bin/sh\n# count N DELAY: numbered lines, slowly\ni=1\nwhile [ $i -le $1 ]; do echo \"line $i\"; "
    "i=$((i+1)); sleep $2; done\nmkdir -p /sly_task_data/results\necho ok > /sly_task_data/results/out.txt\n",
    "weird.sh": "#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' a; echo\nprintf 'bad \\377\\376 bytes\\n'\n"
    "echo 'to stderr' >&2\necho '{\"message\": \"structured\", \"level\": \"error\", \"ts\": 5, \"k\": [1]}'\n"
    "echo '{not json'\nprintf 'no newline at the end'\n",
    "env.sh": "#!/bin/sh\necho TASK_ID=$TASK_ID TASK_TYPE=$TASK_TYPE PYTHONUNBUFFERED=$PYTHONUNBUFFERED\n"
    "grep NoNewPrivs /proc/self/status\nls /sly_task_data\nls /var/run/docker.sock 2>&1 || true\n",
}


def build_task_image(docker_client, busybox_image) -> str:
    return build_script_image(docker_client, busybox_image, TASK_IMAGE, SCRIPTS)


@pytest.fixture(scope="session")
def task_image(docker_client, busybox_image):
    return build_task_image(docker_client, busybox_image)


@pytest.fixture(scope="session")
def user(server):
    return UserClient(server.url, server.admin_token)


class Node:
    """An agent record on the server plus its local storage root; leases tasks like the agent does."""

    def __init__(self, user: UserClient, server, root):
        body = user.create_agent(f"workers-{root.name}")
        self.id, self.token, self.user, self.server, self.root = body["id"], body["token"], user, server, root
        self.api = AgentAPI(server.url, self.token, retries=1)
        self.leased: list[int] = []

    def config(self, **over) -> Config:
        values = dict(
            server_address=self.server.url,
            access_token=self.token,
            host_dir=str(self.root),
            agent_dir=str(self.root),
            min_free_disk_mb=1,
            stop_grace_s=1.0,
            task_dir_cleanup="never",
        )
        values.update(over)
        return Config(**values)

    def lease(self, **task) -> dict:
        """Create a task on the server and take it from a poll, as the supervisor would."""
        created = self.user.create_task(self.id, **task)
        for _ in range(5):
            answer = self.api.poll(free_slots=8, free_gpus=[], running=list(self.leased), wait=1)
            for t in answer["tasks"]:
                if t["id"] == created["id"]:
                    self.leased.append(t["id"])
                    return t
        raise AssertionError(f"task {created['id']} was not handed out")

    def ctx(self, cfg: Config | None = None, **task) -> TestContext:
        return TestContext(self.lease(**task), cfg or self.config())


@pytest.fixture
def node(user, server, tmp_path):
    return Node(user, server, tmp_path / "agent")


@pytest.fixture(params=["file", "api"])
def log_source(request, monkeypatch):
    """Run the test with the log read from the json-file directly, and through the Engine's API."""
    monkeypatch.setenv("SLY_LOG_SOURCE", request.param)
    return request.param
