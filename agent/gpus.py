"""GPUs through NVML (nvidia-ml-py). No library, no driver or no GPU: an empty list, never an error."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def list_gpus(nvml=None) -> list[dict]:
    """One dict per GPU: index, name, uuid, memory_total/used (bytes), utilization (%), temperature (C)."""
    try:
        nvml = nvml or _nvml()
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
        log.debug("no NVML: %s", e)
        return []
    gpus = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            g: dict = {"index": i, "name": _text(nvml.nvmlDeviceGetName(h)), "uuid": _text(nvml.nvmlDeviceGetUUID(h))}
            for key, read in (
                ("memory", lambda h=h: nvml.nvmlDeviceGetMemoryInfo(h)),
                ("utilization", lambda h=h: nvml.nvmlDeviceGetUtilizationRates(h)),
                ("temperature", lambda h=h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            ):
                try:
                    v = read()
                except Exception:  # noqa: BLE001 - some boards lack a sensor; report what there is
                    continue
                if key == "memory":
                    g["memory_total"], g["memory_used"] = int(v.total), int(v.used)
                elif key == "utilization":
                    g["utilization"] = int(v.gpu)
                else:
                    g["temperature"] = int(v)
            gpus.append(g)
    except Exception as e:  # noqa: BLE001
        log.warning("NVML failed while listing GPUs: %s", e)
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return gpus


def gpu_pool(setting: str, nvml=None) -> list[int]:
    """The GPU indices the agent may hand out: config.gpus is 'all', 'none' or '0,2'."""
    setting = (setting or "all").strip().lower()
    if setting == "none":
        return []
    present = [g["index"] for g in list_gpus(nvml)]
    if setting == "all":
        return present
    wanted = []
    for part in setting.split(","):
        part = part.strip()
        if part.isdigit():
            wanted.append(int(part))
    missing = [i for i in wanted if i not in present]
    if missing:
        log.warning("AGENT_GPUS names GPUs this node does not have: %s", missing)
    return [i for i in wanted if i in present]
