"""Mutual TLS between pd processes and HTTPS on the proxy, with certificates the tests make (openssl):
the --tls-* checks, servers that refuse peers without a valid certificate (and keep serving the valid
ones), a server certificate that must name the address dialed, and a whole deployment over TLS that
answers as the plain one does."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys

import grpc
import httpx
import pytest

from pd.bootstrap.client import BootstrapClient, BootstrapError
from pd.bootstrap.server import BootstrapServer
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import bootstrap_pb2_grpc as bpb_grpc
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.auth import auth_metadata
from pd.rpc.tls import TLSConfig, open_channel
from tests.support.certs import OPENSSL, Certs, CertSet, make_certs
from tests.support.cluster import MODEL_NAME, pd_serve

TOKEN = "tls-and-token"
bounded = pytest.mark.timeout(60)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("no openssl command: the TLS tests make their certificates with it")
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls(s: CertSet) -> TLSConfig:
    return TLSConfig(str(s.cert), str(s.key), str(s.ca))


def health_code(channel: grpc.Channel, metadata=()) -> grpc.StatusCode:
    """The status of a registry Health call over ``channel`` (OK when it answered)."""
    try:
        bpb_grpc.BootstrapStub(channel).Health(bpb.HealthRequest(), timeout=5, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def refused_channels(certs: Certs, target: str) -> dict[str, grpc.Channel]:
    """Channels to ``target`` of peers a mutual-TLS server must refuse."""
    ca = certs.good.ca.read_bytes()
    stranger = certs.other
    return {
        "plain": grpc.insecure_channel(target),
        "TLS without a client certificate": grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)),
        "a certificate of another CA": grpc.secure_channel(
            target, grpc.ssl_channel_credentials(ca, stranger.key.read_bytes(), stranger.cert.read_bytes())
        ),
        "another CA's whole set": open_channel(target, tls(stranger)),
    }


# ---- configuration ----


def test_tls_config_needs_all_three_files_in_pem(certs):
    good = certs.good
    assert TLSConfig.from_paths(None, None, None) is None
    assert TLSConfig.from_paths(str(good.cert), str(good.key), str(good.ca)) == tls(good)
    with pytest.raises(ValueError, match=r"missing: --tls-key$"):
        TLSConfig.from_paths(str(good.cert), None, str(good.ca))
    with pytest.raises(ValueError, match=r"missing: --tls-key, --tls-ca$"):
        TLSConfig.from_paths(str(good.cert), "", None)
    with pytest.raises(ValueError, match=r"missing: --tls-cert$"):
        TLSConfig.from_paths(None, str(good.key), str(good.ca))
    with pytest.raises(ValueError, match=r"TLS ca /no/such/ca.pem \(--tls-ca\): No such file"):
        TLSConfig(str(good.cert), str(good.key), "/no/such/ca.pem")
    with pytest.raises(ValueError, match=r"TLS key .* \(--tls-key\) holds no PEM 'PRIVATE KEY'"):
        TLSConfig(str(good.cert), str(good.cert), str(good.ca))  # the certificate given as the key
    with pytest.raises(ValueError, match=r"TLS cert .* \(--tls-cert\) holds no PEM 'BEGIN CERTIFICATE'"):
        TLSConfig(str(good.key), str(good.key), str(good.ca))


@bounded
@pytest.mark.parametrize("module", ["pd.launch.bootstrap", "pd.launch.serve"])
def test_launcher_with_part_of_the_tls_flags_fails_naming_the_missing(certs, module):
    p = subprocess.run(
        [sys.executable, "-m", module, "--port", "0", "--tls-cert", str(certs.good.cert)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert p.returncode == 1, p.stderr
    assert "missing: --tls-key, --tls-ca" in p.stderr
    assert "started" not in p.stderr and "listening" not in p.stderr  # nothing started


def test_every_launcher_takes_the_tls_flags():
    from pd.launch import bootstrap, proxy, serve, worker

    parsers = [bootstrap.build_parser(), proxy.build_parser(), serve.build_parser()[0]]
    parsers += [worker.build_parser(role) for role in ("prefill", "decode", "colocated")]
    for parser in parsers:
        dests = {a.dest: a.default for a in parser._actions}
        assert {k: dests.get(k, "absent") for k in ("tls_cert", "tls_key", "tls_ca")} == dict.fromkeys(
            ("tls_cert", "tls_key", "tls_ca")
        ), parser.prog


def test_pd_serve_hands_the_tls_flags_to_every_child(certs):
    from pd.launch import serve

    args = serve.parse(["--cluster-token-file", "/t", *certs.good.flags()])
    for name, cmd in serve.commands(args, "/m", 1234):
        assert " ".join(certs.good.flags()) in " ".join(cmd), name
        assert "--cluster-token-file" in cmd, name
    plain = serve.parse([])
    assert all("--tls-cert" not in cmd for _, cmd in serve.commands(plain, "/m", 1234))


# ---- gRPC servers ----


@bounded
def test_tls_server_refuses_peers_without_a_valid_certificate_and_keeps_serving(certs):
    """The registry with mutual TLS and the cluster token: a plain client, a TLS client without a
    certificate and clients with another CA's certificate fail (UNAVAILABLE: the hand-shake is refused);
    a valid certificate without the token is UNAUTHENTICATED; the server serves valid peers throughout."""
    server = BootstrapServer(port=0, cluster_token=TOKEN, tls=tls(certs.good)).start()
    try:
        valid = open_channel(server.address, tls(certs.good))
        token = auth_metadata(TOKEN)
        assert health_code(valid, token) == grpc.StatusCode.OK
        for what, channel in refused_channels(certs, server.address).items():
            with channel:
                assert health_code(channel, token) == grpc.StatusCode.UNAVAILABLE, what
            assert health_code(valid, token) == grpc.StatusCode.OK, f"after {what}"
        assert health_code(valid) == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace the token
        valid.close()
        with BootstrapClient(server.address, cluster_token=TOKEN, retry_for=0.0) as plain:
            with pytest.raises(BootstrapError) as err:
                plain.health()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with BootstrapClient(server.address, cluster_token=TOKEN, tls=tls(certs.good)) as client:
            assert client.health().serving
    finally:
        server.stop(grace=0)


@bounded
def test_server_certificate_must_name_the_address_dialed(certs):
    """The test certificate names 127.0.0.1 and localhost: a client dialing 127.0.0.2 (the same listener)
    refuses the server (hostname verification), so a deployment's certificates need the SAN peers dial."""
    server = BootstrapServer(host="0.0.0.0", port=0, tls=tls(certs.good)).start()
    try:
        for host, code in (("127.0.0.1", "OK"), ("localhost", "OK"), ("127.0.0.2", "UNAVAILABLE")):
            with open_channel(f"{host}:{server.port}", tls(certs.good)) as channel:
                assert health_code(channel) == grpc.StatusCode[code], host
    finally:
        server.stop(grace=0)


# ---- a deployment over TLS ----


def completions(url: str, prompts: list[list[int]], verify: ssl.SSLContext | bool) -> list[list[int]]:
    """Greedy token ids of each prompt, the first one streamed (SSE), the rest in one body."""
    out = []
    with httpx.Client(base_url=url, verify=verify, timeout=60) as http:
        for i, prompt in enumerate(prompts):
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            body.update(ignore_eos=True, return_token_ids=True, stream=i == 0)
            if i == 0:
                ids = []
                with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
                out.append(ids)
            else:
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                out.append(r.json()["choices"][0]["token_ids"])
    return out


@pytest.mark.timeout(300)
def test_tls_deployment_answers_https_like_the_plain_one(certs, tiny_model_dir, tmp_path):
    """pd-serve with --tls-* (and the cluster token): every process talks mutual TLS, the proxy serves
    HTTPS that a client trusting the CA reads (no client certificate), and the tokens equal the plain
    deployment's. Its worker ports refuse peers without a valid certificate."""
    prompts = [[5, 9, 2, 7, 11, 3], list(range(3, 40)), [17]]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    common = ("--model-name", MODEL_NAME, "--chunk-size", "16", "--page-size", "4")
    with pd_serve(tiny_model_dir, tmp_path / "plain.log", *common) as url:
        expected = completions(url, prompts, verify=True)
    log = tmp_path / "tls.log"
    flags = (*common, "--cluster-token-file", str(token_file), *certs.good.flags())
    with pd_serve(tiny_model_dir, log, *flags, ca=certs.good.ca) as url:
        assert url.startswith("https://")
        trust = ssl.create_default_context(cafile=certs.good.ca)
        assert completions(url, prompts, verify=trust) == expected
        assert all(len(ids) == 8 for ids in expected)
        with pytest.raises(httpx.HTTPError):  # a client that does not trust the CA
            httpx.get(f"{url}/health", timeout=5)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
        workers = re.findall(
            r"(prefill|decode) rank \d+/\d+ of \S+ serving \S+ on (\S+) \(pid", log.read_text()
        )
        assert sorted(role for role, _ in workers) == ["decode", "prefill"], log.read_text()[-3000:]
        for role, endpoint in workers:
            stub_of = wpb_grpc.PrefillWorkerStub if role == "prefill" else wpb_grpc.DecodeWorkerStub
            for what, channel in refused_channels(certs, endpoint).items():
                with channel, pytest.raises(grpc.RpcError) as err:
                    stub_of(channel).Health(
                        wpb.WorkerHealthRequest(), timeout=5, metadata=auth_metadata(TOKEN)
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (role, what)
            with open_channel(endpoint, tls(certs.good)) as channel:
                stub_of(channel).Health(wpb.WorkerHealthRequest(), timeout=5, metadata=auth_metadata(TOKEN))
        assert httpx.get(f"{url}/health", verify=trust, timeout=5).status_code == 200


def test_certs_are_pem_with_the_sans(certs):
    """The fixture's own check: the node certificate carries the SANs and both usages the tests rely on."""
    text = subprocess.run(
        [str(OPENSSL), "x509", "-in", str(certs.good.cert), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
