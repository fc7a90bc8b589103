"""``jaxdissect.progress.listen``: bars opened in the listening thread report their counts, shown or hidden."""

import threading

from jaxdissect import progress


def test_listen_reports_updates_and_iteration_only_in_its_thread():
    seen = []
    with progress.listen(lambda desc, done, total: seen.append((desc, done, total))):
        bar = progress.progress(total=10, desc="steps", enabled=False)
        bar.update(3)
        bar.update(7)
        bar.set_postfix(loss="1")
        bar.close()
        assert list(progress.progress(range(2), desc="items", enabled=False)) == [0, 1]
        other = []
        t = threading.Thread(target=lambda: other.append(progress.progress(total=1, enabled=False)))
        t.start()
        t.join()
        other[0].update(1)
    assert seen == [("steps", 3, 10), ("steps", 10, 10), ("items", 1, 2), ("items", 2, 2)]
    after = progress.progress(total=2, enabled=False)
    after.update(2)
    assert len(seen) == 4
