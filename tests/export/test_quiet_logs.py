"""Silencing a library's loggers for a block, and only for it."""
import logging

from anomalygpt_edge.export.quiet_logs import quiet_logs


def test_quiet_logs_drops_records_below_the_level_and_restores_the_levels(caplog):
    chatty, strict = logging.getLogger('test.chatty'), logging.getLogger('test.strict')
    strict.setLevel(logging.CRITICAL)
    with caplog.at_level(logging.DEBUG):
        with quiet_logs('test.chatty', 'test.strict', level=logging.WARNING):
            chatty.info('node dump')
            chatty.warning('kept')
            assert strict.level == logging.CRITICAL   # a stricter logger is not loosened
        chatty.info('after the block')
    assert [r.getMessage() for r in caplog.records] == ['kept', 'after the block']
    assert chatty.level == logging.NOTSET
    assert strict.level == logging.CRITICAL
    strict.setLevel(logging.NOTSET)
