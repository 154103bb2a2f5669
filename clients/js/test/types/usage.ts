// Compiled (not run) by contract.test.js: the README's usage type-checks against confab.d.ts.
import { Client, ConfabError, State, type MessageEvent, type SendAck } from "../../src/confab.js";

export async function usage(): Promise<void> {
  const chat = new Client({ url: ["ws://a/v1/ws", "ws://b/v1/ws"], token: async () => "jwt" });
  chat.on("message", (m: MessageEvent) => console.log(m.channel, m.seq, m.user, m.text, m.client_msg_id));
  chat.on("state", (s) => s.state === State.RECONNECTING && console.log(s.retryInMs));
  chat.on("error", (e) => e instanceof ConfabError && console.log(e.code));
  await chat.connect();
  const ack: SendAck = await chat.send("general", "hi", { thread: 3 });
  const page = await chat.history("general", { before: ack.seq, limit: 50 });
  page.messages.forEach((m) => m.edited || m.deleted);
  await chat.markRead("general", ack.seq);
  chat.typing("general");
  const statuses = await chat.subscribePresence(["bob"]);
  if (statuses.bob === "online") chat.close();
  for await (const e of chat.events(["message", "typing"])) {
    if (e.type === "typing") console.log(e.user);
    else console.log(e.text);
  }
}
