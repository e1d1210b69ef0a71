"""The playground page (GET /) in a real headless browser (Debian's chromium driven by Playwright)
against real `loraplex serve` processes, plus its routes and GET /v1/status over plain HTTP.

Two servers: `main` (the tiny Llama of server_fixtures, adapters a0..a2 and a broken one, auth on:
the page must ask for the key) and `script` (no auth; a hand-built tiny Llama whose greedy answer to
any prompt is `<script>alert(1)</script>`, served under a name that is itself an HTML tag), which
checks that nothing the server or the model says is ever parsed as HTML.

The browser tests skip (with the reason) where /usr/bin/chromium or the playwright package is
missing; `.ci/run` installs both. `playwright install` is never called: it downloads browsers.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest
from server_fixtures import make_world, save_tokenizer, start_server, wait_ready
from tiny_models import make_config

pytestmark = pytest.mark.slow  # a real `loraplex serve` subprocess (integration)

BASE = "tiny-base"
ADMIN = "sk-playground-admin"
TENANT = "sk-playground-a0"  # may use a0 only
SCRIPT_BASE = "<img src=x onerror=alert(2)>"  # a served model name that is HTML
SCRIPT_TEXT = "<script>alert(1)</script>"
CHAIN = ["<script>", "alert(1)", "</script>"]
PROMPT = "What is the capital of France?"
MAX_TOKENS = 12

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

_missing = []
if sync_playwright is None:
    _missing.append("the playwright package (pip install playwright)")
if not CHROMIUM.is_file():
    _missing.append(f"{CHROMIUM} (apt-get install chromium)")
needs_browser = pytest.mark.skipif(bool(_missing), reason=f"browser test needs {' and '.join(_missing)}")


# ---- the worlds -----------------------------------------------------------------------------------
def save_script_model(path: Path) -> None:
    """A tiny Llama whose greedy continuation of any prompt is `<script>`, `alert(1)`, `</script>`, EOS.

    Every attention o_proj and MLP down_proj is zero, so the residual stream at the last position is
    the last token's embedding. Embeddings are one-hot: every ordinary token is e0, the chain tokens
    are e1, e2, e3. lm_head row j is the embedding of the token that must precede j (row `<script>` =
    e0, `alert(1)` = e1, `</script>` = e2, EOS = e3; all other rows zero), so after the final RMSNorm
    the next token's logit is sqrt(hidden) = 8 and every other logit is 0: no near ties.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(CHAIN)
    tokenizer.save_pretrained(path)
    chain_ids = tokenizer.convert_tokens_to_ids(CHAIN)
    assert tokenizer.decode(chain_ids) == SCRIPT_TEXT
    config = make_config(
        "llama", vocab_size=len(tokenizer), hidden_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight  # [vocab, hidden]
        embed.zero_()
        embed[:, 0] = 1.0
        for k, token in enumerate(chain_ids):
            embed[token].zero_()
            embed[token, k + 1] = 1.0
        head = model.lm_head.weight  # [vocab, hidden]
        head.zero_()
        for k, token in enumerate([*chain_ids, config.eos_token_id]):
            head[token, k] = 1.0
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    base, adapters = make_world(root, 3)
    (adapters / "broken").mkdir()  # listed like any adapter; its load fails (422)
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    keys = root / "keys.json"
    keys.write_text(json.dumps({TENANT: {"adapters": ["a0"]}}))
    script = root / "script"
    script.mkdir()
    save_script_model(script)
    return root, base, adapters, keys, script


@pytest.fixture(scope="module")
def servers(world):
    root, base, adapters, keys, script = world
    common = ["--dtype", "float32", "--kv-cache-gib", "0.05", "--max-lora-rank", "16"]
    main = start_server(
        [
            *common,
            "--model",
            str(base),
            "--served-model-name",
            BASE,
            "--adapter-dir",
            str(adapters),
            "--max-active-adapters",
            "4",
            "--api-keys-file",
            str(keys),
        ],
        root / "main.log",
        env={"LORAPLEX_API_KEY": ADMIN},
    )
    try:
        script_server = start_server(
            [*common, "--model", str(script), "--served-model-name", SCRIPT_BASE], root / "script.log"
        )
    except BaseException:
        main.terminate()
        raise
    try:
        wait_ready(main)
        wait_ready(script_server)
        yield main, script_server
    finally:
        for s in (main, script_server):
            s.terminate()


@pytest.fixture(scope="module")
def main_server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def script_server(servers):
    return servers[1]


def client(server, key: str | None = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "none", max_retries=0, timeout=60)


def get(server, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + path, headers=headers, timeout=30)


# ---- routes over plain HTTP (no browser needed) ---------------------------------------------------
def test_page_and_files_come_from_the_installed_package(main_server):
    static = resources.files("loraplex.server").joinpath("static")
    for path, name, media in [
        ("/", "index.html", "text/html"),
        ("/playground", "index.html", "text/html"),
        ("/playground/playground.js", "playground.js", "text/javascript"),
        ("/playground/playground.css", "playground.css", "text/css"),
    ]:
        r = get(main_server, path)  # the page holds no secrets: no key needed even with auth on
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"].startswith(media)
        assert r.content == static.joinpath(name).read_bytes()
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
    for path in (
        "/playground/index.html",
        "/playground/app.py",
        "/playground/..%2Fapp.py",
        "/playground/x.js",
    ):
        assert get(main_server, path).status_code == 404, path


def test_page_config_says_whether_a_key_is_needed(main_server, script_server):
    assert get(main_server, "/playground/config.json").json() == {"auth_required": True}
    assert get(script_server, "/playground/config.json").json() == {"auth_required": False}


def test_status_endpoint_has_the_auth_of_info(main_server, script_server):
    assert get(main_server, "/v1/status").status_code == 401
    assert get(main_server, "/v1/status", key="sk-wrong").status_code == 401
    assert get(main_server, "/v1/status", key="sk-wrong").json()["error"]["code"] == "invalid_api_key"
    for model in ("a0", "a1"):
        r = client(main_server).completions.create(model=model, prompt="hello", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
    status = get(main_server, "/v1/status", key=ADMIN).json()
    assert status["ready"] is True and status["draining"] is False and status["model"] == BASE
    assert status["requests"] == {"running": 0, "waiting": 0}
    assert {"a0", "a1"} <= set(status["adapters"]["resident"])
    assert status["adapters"]["device_slots"] == 4
    assert status["adapters"]["device_resident"] >= 2
    cache = status["adapter_cache"]
    assert cache["loads"] >= 2 and cache["device_hits"] > 0 and cache["load_failures"] >= 0
    assert 0 <= status["kv_cache"]["blocks_used"] <= status["kv_cache"]["blocks_total"]
    # a tenant key sees only the adapters it may use
    assert set(get(main_server, "/v1/status", key=TENANT).json()["adapters"]["resident"]) <= {"a0"}
    # auth off: no key needed
    assert get(script_server, "/v1/status").json()["model"] == SCRIPT_BASE


def test_page_script_never_parses_html_or_stores_the_key():
    """The page's rule, checked on its source: no HTML sinks, no storage, no eval, nothing off-site."""
    static = resources.files("loraplex.server").joinpath("static")
    source = static.joinpath("playground.js").read_text()
    js = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("//"))
    for banned in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "DOMParser",
        "createContextualFragment",
        "localStorage",
        "sessionStorage",
        "indexedDB",
        "document.cookie",
        "eval(",
        "new Function",
    ):
        assert banned not in js, banned
    html = static.joinpath("index.html").read_text()
    assert "http://" not in html + js and "https://" not in html + js  # works offline: no CDN


# ---- in the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if _missing:
        pytest.skip(f"browser test needs {' and '.join(_missing)}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


class Watched:
    """A page with its console errors, uncaught exceptions and dialogs recorded."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("dialog", self._on_dialog)

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def watched(browser):
    w = Watched(browser)
    yield w
    w.context.close()


def run_and_wait(page, num_columns: int) -> None:
    page.click("#run")
    page.wait_for_function(
        "n => { const c = document.querySelectorAll('#columns .column');"
        " return c.length === n && [...c].every(x => ['done', 'error'].includes(x.dataset.state)); }",
        arg=num_columns,
    )


def column_texts(page) -> dict[str, str]:
    return page.eval_on_selector_all(
        "#columns .column",
        "cs => Object.fromEntries(cs.map(c => [c.dataset.model, c.querySelector('.output').textContent]))",
    )


@needs_browser
def test_compare_base_and_two_adapters_in_the_browser(main_server, watched, tmp_path):
    page = watched.page
    started = time.monotonic()
    page.goto(main_server.url + "/")
    page.wait_for_selector("#key-panel:not([hidden])")  # auth is on: the page asks for the key first
    assert page.text_content("#status-state") == "API key needed"
    page.fill("#key-input", ADMIN)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#model-list input').length === 5")
    names = page.eval_on_selector_all("#model-list input", "xs => xs.map(x => x.value)")
    assert names == [BASE, "a0", "a1", "a2", "broken"]
    for name in (BASE, "a0", "a1"):
        page.check(f'#model-list input[value="{name}"]')
    # at most three columns: the other boxes are disabled
    assert page.is_disabled('#model-list input[value="a2"]')
    assert page.is_disabled('#model-list input[value="broken"]')

    page.fill("#prompt", PROMPT)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))
    run_and_wait(page, 3)
    shown = column_texts(page)
    api = client(main_server)
    for name in (BASE, "a0", "a1"):
        r = api.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert shown[name] == r.choices[0].message.content, name
        state = page.get_attribute(f'#columns .column[data-model="{name}"]', "data-state")
        assert state == "done", name
        stats = page.text_content(f'#columns .column[data-model="{name}"] .stats')
        assert f"{r.usage.prompt_tokens} in · {r.usage.completion_tokens} out" in stats, stats
        assert " ms" in stats, stats  # time to first token
    page.wait_for_function("() => document.querySelector('#status-state')?.textContent === 'ready'")
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

    # the same three as plain completions
    page.check('input[name="mode"][value="completion"]')
    page.fill("#prompt", "the quick brown fox")
    run_and_wait(page, 3)
    shown = column_texts(page)
    for name in (BASE, "a0", "a1"):
        r = api.completions.create(
            model=name, prompt="the quick brown fox", max_tokens=MAX_TOKENS, temperature=0
        )
        assert shown[name] == r.choices[0].text, name

    assert watched.errors == [] and watched.dialogs == []
    # the key lived in the page's memory only
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert page.evaluate("document.cookie") == "" and watched.context.cookies() == []
    status_text = page.text_content("#status")
    assert "running" in status_text and "resident" in status_text and "cache hits" in status_text

    # a model that fails shows its error in its own column; the others still answer
    page.uncheck('#model-list input[value="a1"]')
    page.check('#model-list input[value="broken"]')
    run_and_wait(page, 3)
    assert page.get_attribute('#columns .column[data-model="broken"]', "data-state") == "error"
    assert "422" in page.text_content('#columns .column[data-model="broken"] .error')
    assert page.get_attribute(f'#columns .column[data-model="{BASE}"]', "data-state") == "done"

    # Stop ends every stream; the server aborts the requests (nothing left running)
    page.uncheck('#model-list input[value="broken"]')
    page.fill("#max-tokens", "400")
    # Click Stop from inside the page the moment the first text arrives: the tiny model writes 400 tokens
    # in well under a second, faster than a click driven from here could follow.
    clicked = page.evaluate(
        """() => new Promise((resolve) => {
            setTimeout(() => resolve(false), 30000);  // never hang the suite
            const root = document.querySelector('#columns');
            const observer = new MutationObserver(() => {
                const outputs = [...root.querySelectorAll('.column .output')];
                const stop = document.querySelector('#stop');
                if (outputs.some((o) => o.textContent.length > 0) && !stop.disabled) {
                    observer.disconnect();
                    stop.click();
                    resolve(true);
                }
            });
            observer.observe(root, {subtree: true, childList: true, characterData: true});
            document.querySelector('#run').click();
        })"""
    )
    assert clicked, "Stop was never enabled while text was arriving"
    # A column whose greedy text reached EOS before the click is "done" (the tiny model writes 400 tokens
    # in well under a second), the others "stopped"; none may stay "running".
    page.wait_for_function(
        "() => [...document.querySelectorAll('#columns .column')].every(c => c.dataset.state !== 'running')"
    )
    states = page.eval_on_selector_all("#columns .column", "cs => cs.map(c => c.dataset.state)")
    assert set(states) <= {"stopped", "done"} and "stopped" in states, states
    deadline = time.monotonic() + 30
    while (
        get(main_server, "/v1/status", key=ADMIN).json()["requests"]["running"]
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert get(main_server, "/v1/status", key=ADMIN).json()["requests"] == {"running": 0, "waiting": 0}
    assert watched.dialogs == [] and [e for e in watched.errors if "422" not in e] == []
    print(f"browser comparison took {time.monotonic() - started:.1f}s")


@needs_browser
def test_generated_html_is_shown_as_text(script_server, watched, tmp_path):
    page = watched.page
    page.goto(script_server.url + "/playground")
    page.wait_for_function("() => document.querySelectorAll('#model-list input').length === 1")
    assert page.is_hidden("#key-panel")  # auth off: no key asked
    assert page.text_content("#model-list .model-name") == SCRIPT_BASE
    page.check("#model-list input")
    page.fill("#prompt", "hi")
    page.fill("#max-tokens", "16")
    run_and_wait(page, 1)
    page.screenshot(path=str(tmp_path / "script.png"), full_page=True)
    output = page.locator("#columns .column .output")
    assert output.text_content() == SCRIPT_TEXT
    assert page.get_attribute("#columns .column", "data-model") == SCRIPT_BASE
    assert page.text_content("#columns .column h3") == SCRIPT_BASE
    # shown as text: no element was made from the answer or the model name, nothing ran
    assert output.evaluate("e => e.children.length") == 0
    assert "&lt;script&gt;" in output.inner_html()
    assert page.locator("#columns script, #columns img, #model-list img").count() == 0
    assert page.evaluate("document.scripts.length") == 1  # playground.js only
    assert watched.dialogs == [] and watched.errors == []


@needs_browser
def test_alias_shows_its_split_and_the_version_that_answered(main_server, watched):
    """An alias is listed with an 'alias' badge whose title is its split; the column of a run shows
    the version that answered (from X-Loraplex-Adapter-Version)."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.put(main_server.url + "/v1/routes/support", json={"versions": {"a1": 100, "a2": 0}}, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    try:
        page = watched.page
        page.goto(main_server.url + "/")
        page.fill("#key-input", ADMIN)
        page.click("#key-form button[type=submit]")
        page.wait_for_function("() => document.querySelector('#model-list input[value=\"support\"]') !== null")
        badge = page.locator('#model-list li:has(input[value="support"]) .badge')
        assert badge.text_content() == "alias" and badge.get_attribute("title") == "alias: a1 100%, a2 0%"
        page.check('#model-list input[value="support"]')
        page.check('#model-list input[value="a0"]')
        page.fill("#prompt", PROMPT)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(MAX_TOKENS))
        run_and_wait(page, 2)
        stats = page.text_content('#columns .column[data-model="support"] .stats')
        assert "version" in stats and "a1" in stats, stats
        assert "a0" in page.text_content('#columns .column[data-model="a0"] .stats')
        api = client(main_server)
        ref = api.chat.completions.create(model="a1", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0)
        assert column_texts(page)["support"] == ref.choices[0].message.content
        assert watched.errors == [] and watched.dialogs == []
    finally:
        httpx.delete(main_server.url + "/v1/routes/support", headers=headers, timeout=30)


def test_response_format_selector(main_server, watched):
    """JSON schema pasted in the page: every column's text is the reply the API gives for the same
    response_format, and it follows the schema; a schema that is not JSON is caught in the page."""
    schema = {
        "type": "object",
        "properties": {"queue": {"enum": ["billing", "tech"]}, "urgent": {"type": "boolean"}},
        "required": ["queue", "urgent"],
    }
    page = watched.page
    page.goto(main_server.url + "/")
    page.wait_for_selector("#key-panel:not([hidden])")
    page.fill("#key-input", ADMIN)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#model-list input').length === 5")
    for name in (BASE, "a0"):
        page.check(f'#model-list input[value="{name}"]')
    assert page.is_hidden("#schema-field")
    page.check('input[name="format"][value="schema"]')
    assert page.is_visible("#schema-field")
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "120")
    page.fill("#schema", "{not json")
    page.click("#run")
    assert page.text_content("#run-note") == "The JSON schema is not valid JSON."
    page.fill("#schema", json.dumps(schema))
    run_and_wait(page, 2)
    shown = column_texts(page)
    api = client(main_server)
    for name in (BASE, "a0"):
        r = api.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=120, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "playground", "schema": schema, "strict": True}},
        )
        assert shown[name] == r.choices[0].message.content, name
        reply = json.loads(shown[name])
        assert reply["queue"] in ("billing", "tech") and isinstance(reply["urgent"], bool)
    page.check('input[name="format"][value="json"]')
    assert page.is_hidden("#schema-field")
    run_and_wait(page, 2)
    for text in column_texts(page).values():
        assert text.startswith("{"), text
    assert watched.errors == [] and watched.dialogs == []


def test_page_preselects_the_base_and_two_demo_adapters(world, watched):
    # Served under the shipped demo adapters' names, the page opens with base + two of them ticked
    # (the preferred order: demo-pirate, then demo-json); other names are never preselected.
    root, base, adapters, _, _ = world
    demo_dir = root / "demo-named"
    for name, source in (("demo-json", "a1"), ("demo-pirate", "a0"), ("zeta", "a2")):
        shutil.copytree(adapters / source, demo_dir / name)
    args = ["--dtype", "float32", "--kv-cache-gib", "0.05", "--max-lora-rank", "16", "--model", str(base)]
    server = start_server(
        [*args, "--served-model-name", BASE, "--adapter-dir", str(demo_dir)], root / "demo.log"
    )
    try:
        wait_ready(server)
        page = watched.page
        page.goto(server.url + "/")
        page.wait_for_function("() => document.querySelectorAll('#columns .column').length === 3")
        checked = page.eval_on_selector_all("#model-list input:checked", "xs => xs.map(x => x.value)")
        assert sorted(checked) == sorted([BASE, "demo-pirate", "demo-json"])
        columns = page.eval_on_selector_all("#columns .column", "cs => cs.map(c => c.dataset.model)")
        assert columns == [BASE, "demo-pirate", "demo-json"]
        assert page.is_disabled('#model-list input[value="zeta"]')
        assert not watched.errors, watched.errors
    finally:
        server.terminate()
