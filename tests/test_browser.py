"""End to end, as a user: a real headless Chromium against the running stack (daphne + own Redis + a real
Celery worker, from ``tests/services.py``), driven over the DevTools protocol (``tests/cdp.py``).

alice signs in, uploads a ``.pt2`` she exported with torch.export, waits for its layer table, starts a
short search and watches the charts and heatmaps fill in live (the number of points grows while it runs),
starts a second run, compares the two, downloads the compressed model and loads and runs it. bob cannot
see or fetch any of it (pages, files, API, websocket). Screenshots of every page go to
``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.cdp import Browser, find_chromium
from tests.conftest_services import celery_worker, live_stack, services  # noqa: F401  (fixtures)
from tests.ui_helpers import PASSWORD, trained_digits_pt2

pytestmark = [
    pytest.mark.browser,
    pytest.mark.services,
    pytest.mark.skipif(
        find_chromium() is None, reason="chromium is not installed (scripts/test.sh installs it)"
    ),
]

SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
ACTIVE = ("queued", "running", "finalizing")


def count_js(chart: str) -> str:
    return f"(document.getElementById('{chart}').data || []).reduce((a, t) => a + (t.x ? t.x.length : 0), 0)"


def sign_in(b: Browser, url: str, username: str) -> None:
    b.goto(f"{url}/accounts/login/")
    b.fill("#id_username", username)
    b.fill("#id_password", PASSWORD)
    b.submit("form")
    assert b.js("location.pathname") == "/", f"{username} could not sign in"


def start_run(
    b: Browser, url: str, model_id: int, agent: str, episodes: int, extra: dict | None = None
) -> int:
    b.goto(f"{url}/runs/new/?model={model_id}")
    values = {
        "#id_target": "analytic",
        "#id_objective": "bops",
        "#id_agent": agent,
        "#id_budget": "0.4",
        "#id_episodes": str(episodes),
        "#id_val_samples": "100",
        "#id_calib_samples": "64",
        "#id_top_k": "1",
        "#id_fine_tune_epochs": "1",
        "#id_checkpoint_every": "5",
        **(extra or {}),
    }
    for selector, value in values.items():
        b.fill(selector, value)
    b.submit("#run-form")
    path = b.js("location.pathname")
    errors = "[...document.querySelectorAll('.form-errors, .errors')].map(e => e.innerText).join(' | ')"
    assert path.startswith("/runs/") and path.rstrip("/").split("/")[-1].isdigit(), b.js(errors)
    return int(path.rstrip("/").split("/")[-1])


def wait_finished(b: Browser, timeout: float) -> None:
    """The run page reloads itself when the run ends; wait for the server-rendered final state."""
    b.wait(
        "document.readyState === 'complete' && window.runPage && !window.runPage.reloading && "
        "['finished', 'failed', 'cancelled'].includes(window.runPage.run.status) && window.runPage.messages > 0",
        timeout,
        "the run to end",
        interval=0.5,
    )


@pytest.mark.timeout(900)
def test_user_journey(live_stack, tmp_path):  # noqa: F811
    from django.contrib.auth.models import User

    from webapp.models import Episode, Run, RunArtifact

    User.objects.create_user("alice", password=PASSWORD)
    User.objects.create_user("bob", password=PASSWORD)
    pt2 = tmp_path / "digits-cnn.pt2"
    trained = trained_digits_pt2(pt2, epochs=4)
    url = live_stack.url
    SHOTS.mkdir(parents=True, exist_ok=True)

    with Browser() as b:
        b.goto(f"{url}/runs/")
        assert b.js("location.pathname") == "/accounts/login/"  # everything needs a sign-in
        b.screenshot(SHOTS / "01-login.png")
        sign_in(b, url, "alice")
        b.screenshot(SHOTS / "02-overview-empty.png")

        # --- upload a .pt2; a worker inspects it; the layer table appears ---------------------------------
        b.goto(f"{url}/models/")
        b.set_file("#form-upload input[type=file]", pt2)
        b.submit("#form-upload")
        model_id = int(b.js("location.pathname").rstrip("/").split("/")[-1])
        b.wait(
            "document.querySelector('#layer-table') !== null || document.querySelector('#model-error')",
            180,
            "the model's inspection",
            interval=0.5,
        )
        assert b.js("document.querySelector('#model-error')") is None, b.js("document.body.innerText")
        rows = b.js("[...document.querySelectorAll('#layer-table tbody tr')].map(r => r.cells[0].innerText)")
        assert rows == ["0", "3", "7", "12"], rows  # the three convs and the classifier of the uploaded net
        b.screenshot(SHOTS / "03-model-layers.png")
        b.goto(f"{url}/models/")
        b.screenshot(SHOTS / "04-models.png")

        # --- start a search; watch it live ------------------------------------------------------------------
        b.goto(f"{url}/runs/new/?model={model_id}")
        b.screenshot(SHOTS / "05-new-run.png")
        run1 = start_run(b, url, model_id, "galen", 80)
        samples = []
        dropped = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = b.js(
                "window.runPage && !window.runPage.reloading ? [window.runPage.run.status, window.runPage.drawn, "
                f"{count_js('chart-reward')}, (document.getElementById('heat-keep').data || [{{z: []}}])[0].z.length,"
                " (document.getElementById('heat-bits').data || [{z: []}])[0].z.length,"
                " window.runPage.received.some(r => r[0] === 'episode'),"
                " (document.getElementById('heat-keep').data || [{x: []}])[0].x.every((v, i) => v === i + 1),"
                " window.runPage.received.filter(r => r[0] === 'history').length,"
                # whole-number episode ticks from the first episode on (no 1, 1.5, 2: labels "1", "2", "2")
                " ((t) => t.every(v => /^\\d+$/.test(v)) && new Set(t).size === t.length)("
                "[...document.querySelectorAll('#chart-reward .xtick text')].map(t => t.textContent))]"
                " : null"
            )
            if state is None:  # the page reloads itself when the run ends
                break
            samples.append(state)
            if state[0] not in ACTIVE:
                break
            if len(samples) == 40:
                b.screenshot(SHOTS / "06-run-live.png")
            if state[0] == "running" and state[1] > 0 and not dropped:
                # Drop the connection like a flaky network: the page reconnects, gets the history again
                # and must neither lose nor repeat an episode.
                b.js("window.runPage.socket.close()")
                dropped = True
            time.sleep(0.3)
        running = [s for s in samples if s[0] == "running" and s[1] > 0]
        grown = sorted({s[1] for s in running})
        assert len(grown) >= 2, f"no growth seen while running: {samples[-5:]}"
        for s in running:  # heatmaps grow with the curves: one row per drawn episode
            assert s[3] == s[1] and s[4] == s[1], s
        assert any(s[5] for s in samples), "no live increment reached the page"
        assert dropped
        # Every sample: episodes 1..k exactly once, in order; the dropped connection came back with a new
        # history and drawing went on.
        assert all(s[6] for s in samples), [s for s in samples if not s[6]][:3]
        assert all(s[8] for s in samples if s[1] > 0), [s for s in samples if not s[8]][:3]
        after = [s for s in running if s[7] >= 2]
        assert after and max(s[1] for s in after) > min(s[1] for s in after), (
            "no episodes after the reconnect"
        )

        wait_finished(b, 600)
        run = Run.objects.get(pk=run1)
        assert run.status == "finished", (run.status, run.error, live_stack.services.log_tail())
        total = Episode.objects.filter(run=run).count()
        assert total == 80
        drawn = b.js("window.runPage.drawn")
        numbers = b.js("document.getElementById('heat-keep').data[0].x")
        assert drawn == total and numbers == list(range(1, total + 1)), "episodes lost or drawn twice"
        assert b.js("document.getElementById('chart-pareto').data[1].x.length") >= 1  # the Pareto front
        assert b.js("document.querySelectorAll('#best-policy tbody tr').length") == 4
        # the best policy's legend sits above the plot area, clear of the bars
        legend_bottom, plot_top = b.js(
            "[document.querySelector('#chart-policy .legend').getBoundingClientRect().bottom,"
            " document.querySelector('#chart-policy .nsewdrag').getBoundingClientRect().top]"
        )
        assert legend_bottom <= plot_top + 1, (legend_bottom, plot_top)
        assert "Test accuracy" in b.js("document.getElementById('results').innerText")
        time.sleep(1)
        b.screenshot(SHOTS / "07-run-finished.png")

        # --- download the compressed model and run it ---------------------------------------------------
        assert RunArtifact.objects.filter(run=run, kind="pt2").exists()
        b.click("a.artifact-link[data-kind='pt2']")
        downloaded = b.wait_download(".pt2", 60)
        import torch

        program = torch.export.load(str(downloaded))
        from compression.data import load_dataset

        data = load_dataset("digits", input_shape=(1, 8, 8), seed=0)
        x, y = data.test.tensors
        with torch.no_grad():
            out = program.module()(x[:64])
        assert tuple(out.shape) == (64, 10)
        acc = float((out.argmax(1) == y[:64]).float().mean())
        assert acc > 0.5, f"compressed model accuracy {acc:.2f} (uncompressed {trained['test_accuracy']:.2f})"

        # --- a second run, then compare -------------------------------------------------------------------
        run2 = start_run(
            b, url, model_id, "amc", 20, {"#id_agent_amc__warmup_episodes": "5", "#id_objective": "macs"}
        )
        wait_finished(b, 600)
        assert Run.objects.get(pk=run2).status == "finished", Run.objects.get(pk=run2).error
        b.goto(f"{url}/runs/")
        b.screenshot(SHOTS / "08-runs.png")
        for rid in (run1, run2):
            b.click(f"#compare-pick input[value='{rid}']")
        b.submit("#compare-pick")
        assert b.js("location.pathname") == "/runs/compare/"
        b.wait("document.getElementById('cmp-keep').data !== undefined", 30, "the comparison charts")
        assert b.js("document.getElementById('cmp-keep').data[0].x.length") == 2
        assert b.js("document.getElementById('cmp-pareto').data.length") == 4  # points + front per run
        differs = b.js(
            "[...document.querySelectorAll('#compare-config tr.differs td:first-child')].map(t => t.innerText)"
        )
        assert any(d.startswith("agent") for d in differs) and any(d.startswith("objective") for d in differs)
        assert b.js("document.querySelectorAll('#compare-summary tbody tr').length") == 2
        time.sleep(1)
        b.screenshot(SHOTS / "09-compare.png")

        for path, name in (
            ("/datasets/", "10-datasets"),
            ("/targets/", "11-targets"),
            ("/api-docs/", "12-api"),
            ("/", "13-overview"),
        ):
            b.goto(url + path)
            b.screenshot(SHOTS / f"{name}.png")
        b.goto(f"{url}/targets/analytic/")
        b.screenshot(SHOTS / "14-target.png")
        b.goto(f"{url}/datasets/")
        b.click("#datasets-table a")
        b.wait("document.readyState === 'complete' && location.pathname !== '/datasets/'", 20)
        b.screenshot(SHOTS / "15-dataset.png")

    # --- bob sees none of it ----------------------------------------------------------------------------
    art = RunArtifact.objects.filter(run_id=run1, kind="pt2").first()
    with Browser() as b:
        sign_in(b, url, "bob")
        for path in (
            f"/runs/{run1}/",
            f"/models/{model_id}/",
            f"/runs/{run1}/files/{art.pk}/",
            f"/runs/{run1}/episodes.csv",
        ):
            status = b.js(f"fetch({json.dumps(url + path)}).then(r => r.status)")
            assert status == 404, (path, status)
        api = b.js(f"fetch('{url}/api/runs/{run1}/artifacts/{art.pk}/').then(r => r.status)")
        assert api == 404
        listed = b.js(f"fetch('{url}/api/runs/').then(r => r.json()).then(d => d.count)")
        assert listed == 0
        code = b.js(
            "new Promise(res => { const ws = new WebSocket(location.origin.replace('http', 'ws') + "
            f"'/ws/runs/{run1}/'); ws.onmessage = () => res('got data'); ws.onclose = e => res(e.code); }})",
            timeout=20,
        )
        assert code == 4403, code
        b.goto(f"{url}/runs/")
        assert f"#{run1} " not in b.js("document.body.innerText")
        b.goto(f"{url}/runs/{run1}/")
        b.screenshot(SHOTS / "16-other-user-404.png")
        assert "Not found" in b.js("document.body.innerText")


@pytest.mark.timeout(300)
def test_long_run_history_arrives_in_parts_and_is_drawn_whole(live_stack):  # noqa: F811
    """A finished 2000-episode run: its history (over 1 MB) is over daphne's 1 MiB websocket message limit, so it
    comes in parts; the page draws every episode once, and says nothing about an overview (none was made)."""
    from tests.ui_helpers import make_model, make_run, make_user

    carol = make_user("carol")
    run = make_run(carol, make_model(carol), episodes=2000, status="finished")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Browser() as b:
        sign_in(b, live_stack.url, "carol")
        b.goto(f"{live_stack.url}/runs/{run.pk}/")
        b.wait("window.runPage && window.runPage.drawn === 2000", 90, "all 2000 episodes drawn")
        kinds = b.js("window.runPage.received.map(r => r[0])")
        numbers = b.js(
            "[].concat(...window.runPage.received.filter(r => r[0].startsWith('history')).map(r => r[1]))"
        )
        assert kinds[0] == "history" and "history_more" in kinds
        assert numbers == list(range(1, 2001))
        assert b.js("document.getElementById('downsampled-note').textContent") == ""
        b.screenshot(SHOTS / "17-long-run-2000-episodes.png")
