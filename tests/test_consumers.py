"""The live stream: access control, history then increments with nothing lost or sent twice, downsampling,
and the same through a real daphne server, a real Redis channel layer and a real websocket client."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from webapp import events
from webapp.consumers import CLOSE_FORBIDDEN, downsample_numbers
from webapp.models import Dataset, Episode, Run, Target, UploadedModel
from webapp.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)


def make_run(owner) -> Run:
    model = UploadedModel.objects.create(owner=owner, name="m", kind="zoo", zoo_arch="small_cnn")
    return Run.objects.create(
        owner=owner,
        model=model,
        dataset=Dataset.objects.get(name="digits", owner=None),
        target=Target.objects.get(name="analytic"),
        agent="amc",
        status="running",
        episodes_total=10,
    )


def add_episode(run: Run, number: int, reward: float = 0.1, is_best: bool = False) -> Episode:
    e = episode_row(run, number, reward, is_best)
    e.save()
    return e


def episode_row(
    run: Run, number: int, reward: float = 0.1, is_best: bool = False, policy: dict | None = None
) -> Episode:
    """An unsaved episode row (``bulk_create`` many at once)."""
    return Episode(
        run=run,
        number=number,
        reward=reward,
        accuracy=0.5,
        latency_ms=1.0,
        macs=1,
        bops=1,
        params=1,
        bytes=1.0,
        cost_ratio=0.5,
        meets_budget=True,
        is_best=is_best,
        policy=policy or {"layers": {}},
    )


def communicator(run_id: int, user=None) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/runs/{run_id}/")
    comm.scope["user"] = user
    return comm


@pytest.fixture
def users(db):
    from webapp.models import ensure_builtin_rows

    ensure_builtin_rows()
    User = get_user_model()
    return (
        User.objects.create_user("owner", password=None),
        User.objects.create_user("other", password=None),
        User.objects.create_user("staff", password=None, is_staff=True),
    )


def test_downsample_keeps_best_so_far_and_ends():
    rows = [(i, float((i * 7919) % 1000) / 1000 + i * 1e-4) for i in range(1, 5001)]
    numbers, down = downsample_numbers(rows, 500)
    assert down and len(numbers) <= 500 and numbers == sorted(set(numbers))
    assert numbers[0] == 1 and numbers[-1] == 5000
    best, improving = float("-inf"), []
    for n, r in rows:
        if r > best:
            best = r
            improving.append(n)
    assert set(improving) <= set(numbers)
    # an even spread: no gap much wider than the average step
    gaps = [b - a for a, b in zip(numbers, numbers[1:], strict=False)]
    assert max(gaps) <= 3 * 5000 / len(numbers)
    assert downsample_numbers(rows[:100], 500) == ([n for n, _ in rows[:100]], False)


def test_history_then_increments_without_duplicates(users, settings):
    owner = users[0]
    run = make_run(owner)
    for n in (1, 2, 3):
        add_episode(run, n, reward=0.1 * n, is_best=True)
    run.log("hello")

    async def scenario():
        comm = communicator(run.pk, owner)
        connected, _ = await comm.connect()
        assert connected
        history = await comm.receive_json_from(timeout=5)
        assert history["type"] == "history" and not history["downsampled"] and history["total"] == 3
        assert [e["number"] for e in history["episodes"]] == [1, 2, 3]
        assert history["run"]["status"] == "running" and history["run"]["id"] == run.pk
        assert [line["message"] for line in history["logs"]] == ["hello"]
        layer = get_channel_layer()
        # an increment the client already has (a replay after a resume, or a race with the history read)
        ep3 = await database_sync_to_async(lambda: Episode.objects.get(run=run, number=3).to_event())()
        await layer.group_send(run.group_name, {"type": "run.episode", "episode": ep3})
        ep4 = await database_sync_to_async(lambda: add_episode(run, 4).to_event())()
        await layer.group_send(run.group_name, {"type": "run.episode", "episode": ep4})
        await layer.group_send(run.group_name, {"type": "run.episode", "episode": ep4})
        msg = await comm.receive_json_from(timeout=5)
        assert msg == {"type": "episode", "episode": ep4}
        line = await database_sync_to_async(lambda: run.log("second").to_event())()
        old = {"seq": 1, "level": "info", "message": "hello", "at": None}
        await layer.group_send(run.group_name, {"type": "run.log", "lines": [old, line]})
        msg = await comm.receive_json_from(timeout=5)
        assert msg["type"] == "log" and [x["message"] for x in msg["lines"]] == ["second"]
        st = await database_sync_to_async(lambda: Run.objects.get(pk=run.pk).status_event())()
        await layer.group_send(run.group_name, {"type": "run.status", "run": st})
        msg = await comm.receive_json_from(timeout=5)
        assert msg["type"] == "status" and msg["run"]["id"] == run.pk
        await comm.send_json_to({"type": "ping"})
        assert await comm.receive_json_from(timeout=5) == {"type": "pong"}
        assert await comm.receive_nothing(timeout=0.2)
        await comm.disconnect()

    asyncio.run(scenario())


def test_events_module_publishes_to_the_group(users):
    """webapp.events (what the workers call) reaches a connected client, from synchronous code."""
    owner = users[0]
    run = make_run(owner)

    async def scenario():
        comm = communicator(run.pk, owner)
        await comm.connect()
        await comm.receive_json_from(timeout=5)
        ep = await database_sync_to_async(lambda: add_episode(run, 1))()
        ok = await asyncio.get_running_loop().run_in_executor(None, events.publish_episode, run, ep)
        assert ok
        assert (await comm.receive_json_from(timeout=5))["episode"]["number"] == 1
        await asyncio.get_running_loop().run_in_executor(None, events.publish_status, run)
        assert (await comm.receive_json_from(timeout=5))["type"] == "status"
        await comm.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("who", ["anonymous", "other"])
def test_others_are_closed_with_4403(users, who):
    from django.contrib.auth.models import AnonymousUser

    owner, other, _ = users
    run = make_run(owner)
    user = AnonymousUser() if who == "anonymous" else other

    async def scenario():
        comm = communicator(run.pk, user)
        await comm.connect()
        out = await comm.receive_output(timeout=5)
        assert out == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}

    asyncio.run(scenario())


def test_missing_run_is_forbidden_too(users):
    async def scenario():
        comm = communicator(999_999, users[0])
        await comm.connect()
        assert (await comm.receive_output(timeout=5))["code"] == CLOSE_FORBIDDEN

    asyncio.run(scenario())


def test_staff_may_watch(users):
    run = make_run(users[0])

    async def scenario():
        comm = communicator(run.pk, users[2])
        await comm.connect()
        assert (await comm.receive_json_from(timeout=5))["type"] == "history"
        await comm.disconnect()

    asyncio.run(scenario())


def test_long_history_is_downsampled(users, settings):
    settings.STREAM_HISTORY_MAX = 50
    run = make_run(users[0])
    best = 0.0
    rows = []
    for n in range(1, 301):
        reward = ((n * 37) % 101) / 100
        is_best = reward > best
        best = max(best, reward)
        rows.append(add_episode(run, n, reward, is_best))

    async def scenario():
        comm = communicator(run.pk, users[0])
        await comm.connect()
        h = await comm.receive_json_from(timeout=10)
        await comm.disconnect()
        return h

    h = asyncio.run(scenario())
    numbers = [e["number"] for e in h["episodes"]]
    assert h["downsampled"] and h["total"] == 300 and len(numbers) <= 50
    assert {e.number for e in rows if e.is_best} <= set(numbers)
    assert numbers[-1] == 300


@pytest.mark.services
def test_live_daphne_websocket_with_session_login(live_stack):
    """A real websocket client logged in with a session cookie against daphne + Redis channel layer."""
    import websockets

    from webapp.models import ensure_builtin_rows

    ensure_builtin_rows()
    User = get_user_model()
    owner = User.objects.create_user("owner", password=None)
    other = User.objects.create_user("other", password=None)
    run = make_run(owner)
    add_episode(run, 1, 0.3, True)

    def cookie(user) -> str:
        c = Client()
        c.force_login(user)
        return f"sessionid={c.cookies['sessionid'].value}"

    url = f"{live_stack.ws_url}/ws/runs/{run.pk}/"
    origin = live_stack.url
    owner_cookie, other_cookie = cookie(owner), cookie(other)

    async def scenario():
        async with websockets.connect(
            url, additional_headers={"Cookie": owner_cookie, "Origin": origin}
        ) as ws:
            history = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert history["type"] == "history" and [e["number"] for e in history["episodes"]] == [1]
            ep2 = await database_sync_to_async(lambda: add_episode(run, 2, 0.4, True))()
            # published from this (test) process through the Redis channel layer, as a worker does
            ok = await asyncio.get_running_loop().run_in_executor(None, events.publish_episode, run, ep2)
            assert ok
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "episode" and msg["episode"]["number"] == 2
        async with websockets.connect(
            url, additional_headers={"Cookie": other_cookie, "Origin": origin}
        ) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd.code == CLOSE_FORBIDDEN
        # another site's page cannot open the stream with the user's cookie
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(
                url, additional_headers={"Cookie": owner_cookie, "Origin": "http://evil.example"}
            ):
                pass

    asyncio.run(scenario())


def test_long_history_goes_out_in_parts_under_daphnes_message_limit(users, settings):
    """Daphne closes a socket on a message over 1 MiB; 600 episodes with 60-layer policies are ~4 MB."""
    settings.STREAM_HISTORY_MAX = 2000
    run = make_run(users[0])
    layers = {
        f"block{i}.conv": {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 8, "sparsity": 0.0} for i in range(60)
    }
    Episode.objects.bulk_create([episode_row(run, n, policy={"layers": layers}) for n in range(1, 601)])

    async def scenario():
        comm = communicator(run.pk, users[0])
        await comm.connect()
        messages = [await comm.receive_json_from(timeout=10)]
        while messages[-1].get("more"):
            messages.append(await comm.receive_json_from(timeout=10))
        await comm.disconnect()
        return messages

    messages = asyncio.run(scenario())
    assert len(messages) > 1 and messages[0]["type"] == "history" and messages[0]["total"] == 600
    assert all(m["type"] == "history_more" for m in messages[1:])
    assert all(len(json.dumps(m)) < 1024 * 1024 for m in messages)
    numbers = [e["number"] for m in messages for e in m["episodes"]]
    assert numbers == list(range(1, 601))
