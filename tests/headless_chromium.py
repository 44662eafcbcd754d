"""Load a page in headless Chromium (Qt WebEngine's build, from the PyQt6-WebEngine wheel) and print what it rendered.

    QT_QPA_PLATFORM=offscreen python tests/headless_chromium.py URL UNTIL TIMEOUT_S

Polls the live DOM every half second until the text UNTIL appears inside ``#root`` (or TIMEOUT_S passes), then
prints one JSON line: the browser's user agent, the page title and the text rendered in ``#root``.
A separate process, because a Qt application owns its thread's event loop.
"""

import json
import sys

from PyQt6.QtCore import QTimer, QUrl
from PyQt6.QtWebEngineWidgets import QWebEngineView
from PyQt6.QtWidgets import QApplication

SNAPSHOT = """JSON.stringify({user_agent: navigator.userAgent, title: document.title,
    root: (document.getElementById('root') || {}).innerText || ''})"""


def main(url: str, until: str, timeout_s: float) -> None:
    app = QApplication(sys.argv[:1])
    view = QWebEngineView()
    polls_left = int(timeout_s * 2)

    def report(snapshot):
        nonlocal polls_left
        polls_left -= 1
        page = json.loads(snapshot) if snapshot else {}
        if until in page.get("root", "") or polls_left <= 0:
            print(json.dumps(page))
            app.quit()

    timer = QTimer()
    timer.timeout.connect(lambda: view.page().runJavaScript(SNAPSHOT, report))
    timer.start(500)
    view.load(QUrl(url))
    app.exec()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
