"""The documentation site (`make docs`): built strictly, its generated reference pages true to the
code, and opened in headless Chromium as a reader would: the home page, the navigation, a search,
a deep page. Screenshots go to build/docs-site/.

Chromium is Debian's (`make chromium`, which `make test` runs first); without it this test fails
rather than skips, naming the fix.
"""

from __future__ import annotations

import functools
import glob
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest
import yaml
from conftest import REPO

SCREENSHOTS = os.path.join(REPO, "build", "docs-site")
# Where the Makefile looks for Debian's Chromium (CHROMIUM=... points elsewhere).
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
DEEP_PAGE = "reference/cli/"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(REPO, "docs", "hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_titles() -> list[str]:
    with open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8") as f:
        config = yaml.load(f, Loader=yaml.BaseLoader)  # BaseLoader: mkdocs.yml's !! tags unread
    return [next(iter(entry)) for entry in config["nav"]]


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> str:
    """The site as `make docs` builds it (--strict: a broken link or anchor fails), in a tmp folder."""
    out = str(tmp_path_factory.mktemp("site"))
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", out],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def served(site):
    """The built site on 127.0.0.1 (a thread of http.server), as its base URL."""
    handler = functools.partial(_QuietHandler, directory=site)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _chromium() -> str:
    explicit = os.environ.get("CHROMIUM")
    for path in ([explicit] if explicit else []) + list(CHROMIUM_PATHS):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.fail("no Chromium: run `make chromium` (apt-get install chromium) or set CHROMIUM=/path")


def test_every_page_is_built_and_in_the_search_index(site, served):
    with urllib.request.urlopen(served + "search/search_index.json", timeout=10) as response:
        index = json.load(response)
    locations = {doc["location"].split("#")[0] for doc in index["docs"]}
    pages = [os.path.relpath(root, site) for root, _, files in os.walk(site)
             if "index.html" in files and not os.path.relpath(root, site).startswith(("assets", "search"))]
    assert len(pages) >= 15, pages
    for page in pages:
        location = "" if page == "." else page + "/"
        assert location in locations, f"{location!r} is not in the search index"
    assert len(index["docs"]) > 2 * len(pages)  # the sections of a page are entries of their own


def test_reference_pages_are_generated_from_the_code(site):
    """Every flag of every entry point, every manifest field and every exit code is on its page."""
    hooks = _hooks()
    with open(os.path.join(site, "reference", "cli", "index.html"), encoding="utf-8") as f:
        cli_html = f.read()
    for prog, parser in hooks.entry_parsers():
        assert prog in cli_html
        for action in parser._actions:
            for option in [] if action.dest == "help" else action.option_strings:
                assert f">{option}<" in cli_html, f"{prog} {option} is not on the CLI page"
    from export import errors
    from export.runtime import manifest

    with open(os.path.join(site, "reference", "manifest", "index.html"), encoding="utf-8") as f:
        manifest_html = f.read()
    for key in manifest.FIELDS:
        assert f"<code>{key}</code>" in manifest_html
    with open(os.path.join(site, "reference", "exit-codes", "index.html"), encoding="utf-8") as f:
        codes_html = f.read()
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.ExportError) and cls is not errors.ExportError:
            assert f"<td>{cls.exit_code}</td>\n<td><code>{cls.__name__}</code>" in codes_html


def test_every_entry_point_is_on_the_cli_page():
    """Each `python -m export...` module (a __main__.py) has its parser on the generated page."""
    mains = glob.glob(os.path.join(REPO, "export", "**", "__main__.py"), recursive=True)
    commands = {"python -m " + ".".join(os.path.relpath(os.path.dirname(m), REPO).split(os.sep))
                for m in mains}
    documented = {prog for prog, _ in _hooks().entry_parsers()}
    assert commands <= documented, f"entry points without a CLI reference: {commands - documented}"


def test_manifest_page_lists_a_real_manifests_keys_in_order(artifact_factory):
    """The generated 'in the order written' table against a manifest the pipeline published."""
    from export.runtime import manifest

    _, results = artifact_factory(formats=("onnx",))
    with open(results["onnx"].manifest_path, encoding="utf-8") as f:
        written = list(json.load(f))
    named = [key.strip("`") for key, _, _ in _hooks()._written_fields(manifest) if not key.startswith("(")]
    # The spreads (the reference's and the format's facts) fill the gaps; the named keys keep order.
    assert [k for k in written if k in named] == [k for k in named if k in written]
    assert set(written) - set(named) <= {"config", "shapes", "masks", "model", "opset"}, written


def test_readme_links_resolve(site):
    """mkdocs checks the site's links; README.md is not part of the site, so this checks its own:
    every relative link names a file of the repo (GitHub shows docs/*.md as pages), and an anchor
    into a docs page is a heading of that page as the site builds it."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", readme)
             if not link.startswith(("http://", "https://", "#"))]
    assert any(link.startswith("docs/") for link in links), "README.md links to no docs page"
    for link in links:
        path, _, anchor = link.partition("#")
        assert os.path.exists(os.path.join(REPO, path)), f"README.md links to {path}, which does not exist"
        if anchor:
            page = os.path.splitext(os.path.relpath(path, "docs"))[0]
            html = os.path.join(site, "" if page == "index" else page, "index.html")
            with open(html, encoding="utf-8") as f:
                assert f'id="{anchor}"' in f.read(), f"README.md links to {link}: no such heading"


def _heading(page) -> str:
    return page.locator("h1").first.inner_text().rstrip("¶").strip()  # ¶: the permalink


def test_site_in_chromium(served):
    """Home page, navigation, a search, a deep page; screenshots under build/docs-site/."""
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    os.makedirs(SCREENSHOTS, exist_ok=True)
    profile = os.path.join(SCREENSHOTS, "profile")
    shutil.rmtree(profile, ignore_errors=True)
    errors, outside = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, viewport={"width": 1280, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("request", lambda r: r.url.startswith(("http", "ws")) and not r.url.startswith(served)
                    and outside.append(r.url))
            page.goto(served)
            assert _heading(page) == "xattn"
            nav = page.locator("nav.md-nav--primary > ul > li > a, nav.md-nav--primary > ul > li > label")
            titles = [" ".join(t.split()) for t in nav.all_inner_texts()]
            assert list(dict.fromkeys(t for t in titles if t)) == _nav_titles()  # the open page: twice
            page.screenshot(path=os.path.join(SCREENSHOTS, "home.png"))

            # Search, as a reader types it: the worker loads search/search_index.json.
            page.locator("input.md-search__input").click()
            page.keyboard.type("opset")
            page.wait_for_selector(".md-search-result__item", timeout=15000)
            assert "matching document" in page.locator(".md-search-result__meta").inner_text()
            hrefs = page.locator(".md-search-result__item a").evaluate_all("els => els.map(e => e.href)")
            assert any(DEEP_PAGE in h for h in hrefs), hrefs
            page.screenshot(path=os.path.join(SCREENSHOTS, "search.png"))

            # A deep page, reached through the navigation.
            page.keyboard.press("Escape")
            page.goto(served + DEEP_PAGE)
            assert _heading(page) == "Command-line flags"
            assert page.locator(f"nav.md-nav--primary a.md-nav__link--active[href$='{DEEP_PAGE}'], "
                                "nav.md-nav--primary .md-nav__link--active").count() >= 1
            assert page.locator("table code", has_text="--lengths").count() >= 1
            page.screenshot(path=os.path.join(SCREENSHOTS, "deep.png"))
        finally:
            browser.close()
    assert not errors, errors
    assert not outside, f"the site fetched from outside 127.0.0.1: {outside}"
