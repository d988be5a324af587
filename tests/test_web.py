"""The chat page at GET /, driven in real headless Chromium (selenium) against serve_demo.py and the tiny model.

One server and one browser for the whole module; the tests run in order and continue one conversation. CI
installs Debian's chromium, chromium-driver and fonts-tibetan-machine (.ci/run); without them, these tests
skip.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT
from tests.test_server import TIBETAN, _post, _start_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT, PHONE_SCREENSHOT = ROOT / "docs" / "chat_page.png", ROOT / "docs" / "chat_page_phone.png"
CONTEXT, CAP = 512, 400  # the tiny model's context (max_position_embeddings), and the server's answer cap
SERVER_OPTIONS = ["--temperature", "0", "--max_new_tokens", "64", "--max_total_tokens", str(CONTEXT),
                  "--max_new_tokens_cap", str(CAP)]
# Real Tibetan sentences from the shipped Nanhai sample, far over the tiny model's 512 tokens.
_NANHAI = (ROOT / "data/pt/bo/nanhai_modern_deseg.txt").read_text(encoding="utf-8")
TOO_LONG = _NANHAI[:_NANHAI.index("། ", 700) + 1].replace("\n", " ")
FOLLOW_UP = "What did she do next?"

# the conversation's state, shared by the tests of this module (they run in file order)
SEEN: dict = {}


def _missing() -> list[str]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return missing


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """The page's server, and one with --no_web_ui (both start at once: loading is most of the time)."""
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(_start_server, tiny_model_dir, *SERVER_OPTIONS),
                    pool.submit(_start_server, tiny_model_dir, "--no_web_ui", "--max_new_tokens", "16",
                                "--max_new_tokens_cap", "64", "--max_total_tokens", "256")]
        started = [future.result() for future in starting]
    yield {"page": started[0], "no_web_ui": started[1]}
    for proc, _ in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(servers):
    proc, url = servers["page"]
    return url, proc


@pytest.fixture(scope="module")
def browser(server):
    missing = _missing()
    if missing:
        pytest.skip(f"no browser to test the chat page: {', '.join(missing)} missing (CI installs them: "
                    "apt-get install chromium chromium-driver fonts-tibetan-machine; pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # both paths given: selenium downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900",
                "--lang=en-US", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(driver, script: str, timeout: float = 30):
    """The value of ``script`` (JavaScript returning something) once it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for: {script}")


def _requests(driver) -> list[dict]:
    """The requests the page sent since the last call (Chrome's performance log: DevTools Network events)."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            out.append(message["params"]["request"])
    return out


def _chat_bodies(driver) -> list[dict]:
    return [json.loads(r["postData"]) for r in _requests(driver) if r["url"].endswith("/api/chat")]


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


def _set(driver, selector: str, value) -> None:
    driver.execute_script("const e = document.querySelector(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", selector, str(value))


def _button(driver, name: str):
    from selenium.webdriver.common.by import By

    found = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.accessible_name == name]
    assert found, f"no button named {name!r}"
    return found[-1]


def _ask(driver, text: str, via_enter: bool = True) -> str:
    """Type ``text``, send it, wait for the answer to end; return the answer's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg"))
    box = driver.find_element(By.ID, "input")
    if via_enter:
        box.send_keys(text, Keys.ENTER)
    else:
        _set(driver, "#input", text)
        _button(driver, "Send").click()
    _wait(driver, f"return document.querySelectorAll('.msg').length >= {before + 2} "
                  "&& !document.getElementById('send').hidden")
    last = driver.find_elements(By.CSS_SELECTOR, ".msg")[-1]
    return last.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")


def test_page_loads_without_errors_or_requests_to_other_hosts(server, browser):
    url, _ = server
    browser.get(url + "/")
    _wait(browser, "return document.getElementById('model').textContent === 'stories260K'")
    assert _errors(browser) == []
    requests = _requests(browser)
    assert {r["url"] for r in requests} == {url + "/", url + "/web/chat.css", url + "/web/chat.js",
                                            url + "/api/limits"}
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href").startswith("data:")
    assert _button(browser, "Send").is_displayed()
    stop = browser.find_element("id", "stop")  # hidden until an answer is being generated
    assert stop.get_attribute("aria-label") == "Stop" and not stop.is_displayed()
    # the page learned the model's room, and caps the answer length to the server's cap
    assert "512 tokens" in browser.find_element("id", "status").text
    assert browser.find_element("id", "max-new-tokens").get_attribute("max") == str(CAP)


def test_tibetan_question_gets_an_answer_that_grows_while_streaming(server, browser):
    url, _ = server
    _set(browser, "#max-new-tokens", 48)
    # every change of the answer's text, as the page shows it
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const t = document.querySelector('.msg.assistant:last-of-type .text');
          if (t) window.lengths.push(t.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});""")
    answer = _ask(browser, TIBETAN)
    lengths = browser.execute_script("return window.lengths")
    growth = sorted(set(lengths))
    assert len(growth) >= 4 and lengths == sorted(lengths), lengths  # it grew, piece by piece
    (body,) = _chat_bodies(browser)
    assert body["query"] == TIBETAN and body["history"] == [] and body["stream"] is True
    assert body["temperature"] == 0 and body["max_new_tokens"] == 48
    # what the page shows is the server's answer to what the page sent
    assert answer == _post(url + "/api/chat", {**body, "stream": False})[1]["output"] and answer.strip()
    # the question is shown in a Tibetan font, scaled by its alias (fonts-tibetan-machine in CI)
    question = browser.find_element("css selector", ".msg.user .text")
    assert question.get_attribute("lang") == "bo"
    loaded = browser.execute_script("return [...document.fonts].filter(f => f.status === 'loaded')"
                                    ".map(f => f.family)")
    assert any("Yak Tibetan" in family for family in loaded), loaded
    # shown larger than the same font at its own size: the alias's size-adjust (Latin text keeps its size)
    widths = browser.execute_script("""
        const probe = (family, text) => {
          const s = Object.assign(document.createElement('span'), {textContent: text});
          s.style.cssText = 'position: absolute; white-space: nowrap; font-size: 16px';
          s.style.fontFamily = family;
          document.body.append(s);
          const width = s.getBoundingClientRect().width;
          s.remove();
          return width;
        };
        const page = getComputedStyle(document.body).fontFamily;
        return [probe(page, arguments[0]), probe('"Tibetan Machine Uni"', arguments[0]),
                probe(page, 'Latin'), probe('system-ui, sans-serif', 'Latin')];""", TIBETAN)
    assert widths[0] > 1.5 * widths[1] and widths[2] == pytest.approx(widths[3], rel=0.01), widths
    SEEN["turns"] = [[TIBETAN, answer]]


def test_follow_up_question_carries_the_history_and_trims_the_oldest_turn(server, browser):
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    assert SEEN.get("turns"), "needs the previous test's conversation"
    box = browser.find_element("id", "input")
    box.send_keys("one line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "and another")  # Shift+Enter: a new line
    assert box.get_property("value") == "one line\nand another" and len(_chat_bodies(browser)) == 0
    _set(browser, "#input", "")
    answer = _ask(browser, FOLLOW_UP, via_enter=False)
    (body,) = _chat_bodies(browser)
    assert body["query"] == FOLLOW_UP and body["history"] == SEEN["turns"]
    assert answer == _post(url + "/api/chat", {**body, "stream": False})[1]["output"]
    SEEN["turns"].append([FOLLOW_UP, answer])
    # A third question does not fit with both turns and 48 new tokens: the oldest turn is left out.
    _ask(browser, TIBETAN)
    (body,) = _chat_bodies(browser)
    assert body["history"] == SEEN["turns"][1:] and body["max_new_tokens"] == 48
    status, count = _post(url + "/api/count_tokens", {"query": TIBETAN, "history": SEEN["turns"]})
    assert status == 200 and count["prompt_tokens"] + 48 > CONTEXT
    assert "1 oldest turn left out" in browser.find_element("id", "status").text
    assert _errors(browser) == []
    browser.find_element("css selector", "#settings summary").click()  # the screenshot shows the settings
    browser.execute_async_script("const log = document.getElementById('log'); log.scrollTop = log.scrollHeight;"
                                 "requestAnimationFrame(() => requestAnimationFrame(arguments[0]));")
    browser.save_screenshot(str(SCREENSHOT))


def test_stop_aborts_the_answer_and_the_server_frees_the_slot(server, browser):
    from selenium.webdriver.common.by import By

    url, _ = server
    _button(browser, "Clear conversation").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    _set(browser, "#max-new-tokens", CAP)  # more than the room: capped to what the prompt leaves
    _set(browser, "#input", TIBETAN)
    stop = browser.find_element(By.ID, "stop")
    _button(browser, "Send").click()
    _wait(browser, "const t = document.querySelector('.msg.assistant .text');"
                   "return t && t.textContent.length > 5")
    stop.click()
    assert stop.accessible_name == "" and stop.get_attribute("aria-label") == "Stop"  # hidden again at once
    _wait(browser, "return !document.getElementById('send').hidden", timeout=5)
    start = time.monotonic()
    while _health(url)["running"] and time.monotonic() - start < 5:
        time.sleep(0.05)
    load = _health(url)
    assert load["running"] == load["waiting"] == 0, load
    message = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    shown = message.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")
    time.sleep(0.3)
    assert message.find_element(By.CSS_SELECTOR, ".text").get_property("textContent") == shown  # no more text
    assert "(stopped)" in message.text
    (body,) = _chat_bodies(browser)
    assert body["history"] == [] and body["max_new_tokens"] < CAP  # cleared; capped to the room left
    assert body["max_new_tokens"] + _post(url + "/api/count_tokens", body)[1]["prompt_tokens"] == CONTEXT
    full = _post(url + "/api/chat", {**body, "stream": False})[1]["output"]
    assert full.startswith(shown) and len(full) > len(shown)  # it was cut while generating
    # the part that came can be copied
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": url, "permissions": [
        "clipboardReadWrite", "clipboardSanitizedWrite"]})
    _button(browser, "Copy answer").click()
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert copied == shown and shown


def test_an_over_long_question_shows_the_servers_error(server, browser):
    from selenium.webdriver.common.by import By

    url, _ = server
    _ask(browser, TOO_LONG, via_enter=False)
    error = browser.find_element(By.CSS_SELECTOR, ".msg.error")
    body = _chat_bodies(browser)[0]
    status, answer = _post(url + "/api/chat", body)
    assert status == 400 and error.text == answer["error"]["message"]
    assert f"over the limit of {CONTEXT} tokens" in error.text and error.get_attribute("role") == "alert"
    assert _button(browser, "Send").is_displayed()


def test_usable_at_phone_width(server, browser):
    browser.set_window_size(390, 800)
    try:
        _wait(browser, "return window.innerWidth <= 400")
        _button(browser, "Clear conversation").click()
        browser.find_element("css selector", "#settings summary").click()  # closed
        _set(browser, "#max-new-tokens", 48)
        _ask(browser, TIBETAN)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        send = _button(browser, "Send")
        right = browser.execute_script("return arguments[0].getBoundingClientRect().right", send)
        assert send.is_displayed() and right <= 390
        browser.save_screenshot(str(PHONE_SCREENSHOT))
    finally:
        browser.set_window_size(1000, 900)


def test_limits_and_count_tokens(server):
    """What the page fits conversations with (no browser needed): the prompt length equals the prompt that
    the server encodes for the same conversation (the OpenAI endpoint's usage)."""
    url, _ = server
    with urllib.request.urlopen(url + "/api/limits", timeout=10) as r:
        limits = json.load(r)
    assert limits == {"model": "stories260K", "max_total_tokens": CONTEXT, "max_new_tokens_cap": CAP,
                      "max_new_tokens": 64, "temperature": 0.0, "system_prompt": None, "max_history_turns": 16,
                      "max_query_chars": 8000}
    turns = [[TIBETAN, "An answer."]]
    status, count = _post(url + "/api/count_tokens", {"query": FOLLOW_UP, "history": turns})
    messages = [{"role": "user", "content": TIBETAN}, {"role": "assistant", "content": "An answer."},
                {"role": "user", "content": FOLLOW_UP}]
    usage = _post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 1})[1]["usage"]
    assert status == 200 and count == {"prompt_tokens": usage["prompt_tokens"], "max_total_tokens": CONTEXT}
    status, error = _post(url + "/api/count_tokens", {"query": "", "history": turns})
    assert status == 400 and "'query' is required" in error["error"]["message"]


def test_the_server_prints_the_page_url(server):
    url, proc = server
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert f"chat page: open {url}/ in a browser" in out


def test_no_web_ui_turns_the_page_off(servers):
    proc, url = servers["no_web_ui"]
    for path in ("/", "/web/chat.js"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path, timeout=10)
        assert e.value.code == 404
    with urllib.request.urlopen(url + "/api/limits", timeout=10) as r:  # the API stays
        assert json.load(r)["max_total_tokens"] == 256
    proc.terminate()
    assert "chat page" not in proc.communicate(timeout=30)[0]
