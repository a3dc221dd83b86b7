"""The projects' request bodies: a Supervisely project posted whole, a page of items added to one."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from server.http.fields import SafeName, SafePath, Size, UserIn


class ItemRef(BaseModel):
    name: SafePath
    sha256: str
    size: Size
    ann: Any = None  # Supervisely annotation JSON, checked by protocol.sly_format (errors name the item)


class DatasetIn(BaseModel):
    name: SafeName
    items: list[ItemRef] = []


class UserItemRef(ItemRef, UserIn):
    pass


class UserDatasetIn(DatasetIn, UserIn):
    # pydantic validates the narrower item type; mypy's list invariance does not model a field re-declared
    items: list[UserItemRef] = []  # type: ignore[assignment]


class ProjectIn(UserIn):
    name: SafeName
    meta: Any = None  # Supervisely project meta; absent: the empty meta
    datasets: list[UserDatasetIn] = []


# Items in one POST /api/v1/projects/{id}/items: a page is checked and inserted in one request.
PAGE_MAX = 5000


class ProjectItemsIn(UserIn):
    """A page of items added to one dataset of a stored project (the dataset is made if new)."""

    dataset: SafeName
    items: list[UserItemRef] = Field(min_length=1, max_length=PAGE_MAX)
