"""The official openai client against the proxy: completions and chat, streamed and not."""

from __future__ import annotations

import openai

from tests.proxy.utils import Cluster


def test_openai_client_completions_and_chat(cluster: Cluster) -> None:
    proxy = cluster.proxy(prefill=["p0", "p1"], decode=["d0", "d1"],
                          extra=["--api-key", "sk-client-test"])  # fmt: skip
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client-test", max_retries=0)

    comp = client.completions.create(model="stub-model", prompt="a b c", max_tokens=5)
    assert comp.choices[0].text == " tok0 tok1 tok2 tok3 tok4"
    assert comp.usage is not None and comp.usage.completion_tokens == 5
    assert comp.usage.prompt_tokens_details is not None
    assert comp.usage.prompt_tokens_details.cached_tokens == 3

    stream = client.completions.create(
        model="stub-model", prompt="a b c", max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    msg = client.chat.completions.create(
        model="stub-model", messages=[{"role": "user", "content": "hi there"}], max_tokens=3, n=2
    )
    assert [c.message.content for c in msg.choices] == [" tok0 tok1 tok2"] * 2
    assert msg.usage is not None and msg.usage.completion_tokens == 6

    chat_stream = client.chat.completions.create(
        model="stub-model", messages=[{"role": "user", "content": "hi there"}], max_tokens=3,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chat_chunks = list(chat_stream)
    text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert text == " tok0 tok1 tok2"
    usage = chat_chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens

    models = client.models.list()
    assert [m.id for m in models.data] == ["stub-model"]

    bad = openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.completions.create(model="stub-model", prompt="a", max_tokens=1)
        raise AssertionError("expected an authentication error")
    except openai.AuthenticationError as exc:
        assert exc.status_code == 401
