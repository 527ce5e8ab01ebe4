async def test_health(client):
    r = await client.get("/v2/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok"}


async def test_clients_crud(client, admin):
    r = await client.get("/v2/clients", headers=admin)
    assert r.status_code == 200 and r.json() == []
    r = await client.post("/v2/clients", json={"client_id": "sealink", "name": "SeaLink"}, headers=admin)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["client_id"] == "sealink" and body["status"] == "active" and body["created_at"].endswith("Z")
    r = await client.post("/v2/clients", json={"client_id": "sealink", "name": "SeaLink"}, headers=admin)
    assert r.status_code == 409 and r.json()["success"] is False
