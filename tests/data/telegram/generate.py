"""Generate tests/data/telegram/updates.json: a corpus of Telegram Bot API updates.

Every update is built from python-telegram-bot's own types (telegram.Update,
telegram.Message, ...) and serialised with the library's .to_dict(), so the
JSON shapes come from an independent implementation of the Bot API, not from
keel. Three documented post-processing steps follow:

* to_dict() emits group_chat_created / supergroup_chat_created /
  channel_chat_created / delete_chat_photo as false on every message; the Bot
  API only ever sends them when true, so false values of those four are dropped;
* to_dict() drops empty lists, but the Bot API always sends the required
  message_reaction.old_reaction / new_reaction arrays, so they are put back;
* three "future" cases are made by editing the dicts (unknown update type,
  unknown message field, unknown message content).

The script then checks that update_ids increase strictly from 1000, that each
update parses back with telegram.Update.de_json (offline Bot, dummy token) and
round-trips to the same dict, and that the library's own reading of each
update agrees with the expected keel "kind".

Run:  python tests/data/telegram/generate.py   (rewrites updates.json)
"""

import copy
import json
import os
from datetime import datetime, timedelta, timezone

import telegram
from telegram import (
    Audio, Bot, CallbackQuery, Chat, ChatMemberBanned, ChatMemberLeft,
    ChatMemberMember, ChatMemberUpdated, Contact, Dice, Document,
    ForumTopicCreated, InlineKeyboardButton, InlineKeyboardMarkup, Location,
    Message, MessageEntity, MessageReactionUpdated, PhotoSize, Poll, PollOption,
    ReactionTypeEmoji, Sticker, Update, User, Video, Voice,
)

KINDS = {"text", "photo", "document", "voice", "audio", "video", "sticker",
         "location", "contact", "poll", "dice", "edit", "channel_post",
         "callback", "service", "reaction", "unknown"}
FALSE_ONLY_FLAGS = ("group_chat_created", "supergroup_chat_created",
                    "channel_chat_created", "delete_chat_photo")

BOT = User(999, "Keel", is_bot=True, username="KeelTestBot")
ANN = User(111, "Ann", is_bot=False, language_code="en")
BOB = User(112, "Bob", is_bot=False, last_name="Builder", username="bob_b")
PRIVATE = Chat(111, Chat.PRIVATE, first_name="Ann")
GROUP = Chat(-222, Chat.GROUP, title="Keel Test Group")
FORUM = Chat(-1001333, Chat.SUPERGROUP, title="Keel Forum", is_forum=True)
CHANNEL = Chat(-1001444, Chat.CHANNEL, title="Keel News", username="keel_news")
MIGRATED = Chat(-1001555, Chat.SUPERGROUP, title="Keel Test Group")
T0 = datetime(2026, 1, 15, 10, 0, 0, tzinfo=timezone.utc)

cases = []  # (name, kind, telegram.Update)


def at(i):
    """A deterministic send time: one minute per case."""
    return T0 + timedelta(minutes=i)


def add(name, kind, **update_fields):
    cases.append((name, kind, Update(1000 + len(cases), **update_fields)))


def msg(message_id, chat, user=ANN, **fields):
    fields.setdefault("date", at(len(cases)))
    return Message(message_id, chat=chat, from_user=user, **fields)


def ent(kind, text, part, occurrence=0):
    """A MessageEntity covering `part` in `text`, offsets in UTF-16 code units."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(part, start + 1)
    u16 = lambda s: len(s.encode("utf-16-le")) // 2
    return MessageEntity(kind, u16(text[:start]), u16(part))


def text_msg(message_id, chat, text, user=ANN, entities=(), **fields):
    return msg(message_id, chat, user, text=text, entities=list(entities), **fields)


def photo_sizes(tag):
    sizes = [(90, 67, 1310), (320, 240, 15230), (800, 600, 63512), (1280, 960, 120774)]
    return [PhotoSize(f"AgACAgIAAxkBAAI{tag}{i}", f"AQAD{tag}{i}", w, h, n)
            for i, (w, h, n) in enumerate(sizes)]


def cmd(text, command):
    return [ent(MessageEntity.BOT_COMMAND, text, command)]


def build():
    # --- plain text and addressing -------------------------------------------------
    add("private_text", "text", message=text_msg(10, PRIVATE, "hello keel"))
    t = "/help@KeelTestBot"
    add("group_command_addressed_to_us", "text",
        message=text_msg(20, GROUP, t, entities=cmd(t, t)))
    t = "/help@OtherBot"
    add("group_command_addressed_to_other_bot", "text",
        message=text_msg(21, GROUP, t, entities=cmd(t, t)))
    t = "hey @KeelTestBot what's on today?"
    add("group_mention", "text",
        message=text_msg(22, GROUP, t, entities=[ent(MessageEntity.MENTION, t, "@KeelTestBot")]))
    earlier_bot_reply = text_msg(19, GROUP, "Here is the summary.", user=BOT, date=at(0))
    add("group_reply_to_bot", "text",
        message=text_msg(23, GROUP, "thanks, and tomorrow?", user=BOB,
                         reply_to_message=earlier_bot_reply))
    add("group_plain_not_addressed", "text",
        message=text_msg(24, GROUP, "lunch at noon?", user=BOB))
    add("private_start", "text", message=text_msg(11, PRIVATE, "/start", entities=cmd("/start", "/start")))
    t = "/start PAYLOAD123"
    add("private_start_with_payload", "text", message=text_msg(12, PRIVATE, t, entities=cmd(t, "/start")))
    # A message inside a forum topic: Telegram sets reply_to_message to the
    # topic's creation service message even though the user did not reply.
    topic_root = msg(77, FORUM, BOB, date=at(0), message_thread_id=77,
                     forum_topic_created=ForumTopicCreated("Planning", 7322096))
    add("forum_topic_message", "text",
        message=text_msg(78, FORUM, "topic message", message_thread_id=77,
                         is_topic_message=True, reply_to_message=topic_root))

    # --- media and other content -------------------------------------------------
    cap = "sunset 🌅 #holiday"
    add("private_photo_with_caption", "photo",
        message=msg(13, PRIVATE, photo=photo_sizes("A"), caption=cap,
                    caption_entities=[ent(MessageEntity.HASHTAG, cap, "#holiday")]))
    add("album_photo_1", "photo",
        message=msg(14, PRIVATE, photo=photo_sizes("B"), media_group_id="13912345678901234",
                    caption="two pics"))
    add("album_photo_2", "photo",
        message=msg(15, PRIVATE, photo=photo_sizes("C"), media_group_id="13912345678901234"))
    add("private_document", "document",
        message=msg(16, PRIVATE, caption="the report",
                    document=Document("BQACAgIAAxkBAAID", "AgADdoc1", file_name="report Q1.pdf",
                                      mime_type="application/pdf", file_size=482113)))
    add("private_voice", "voice",
        message=msg(17, PRIVATE, voice=Voice("AwACAgIAAxkBAAIE", "AgADvoice1", duration=4,
                                             mime_type="audio/ogg", file_size=13107)))
    add("private_audio", "audio",
        message=msg(18, PRIVATE, audio=Audio("CQACAgIAAxkBAAIF", "AgADaudio1", duration=215,
                                             performer="The Testers", title="Green Bar",
                                             file_name="green_bar.mp3", mime_type="audio/mpeg",
                                             file_size=3440001)))
    add("private_video", "video",
        message=msg(19, PRIVATE, video=Video("BAACAgIAAxkBAAIG", "AgADvideo1", 1280, 720, 12,
                                             thumbnail=PhotoSize("AAMCAgADvthumb", "AQADvthumb",
                                                                 320, 180, 9011),
                                             file_name="clip.mp4", mime_type="video/mp4",
                                             file_size=2202009)))
    add("private_sticker", "sticker",
        message=msg(20, PRIVATE, sticker=Sticker("CAACAgIAAxkBAAIH", "AgADsticker1", 512, 512,
                                                 is_animated=False, is_video=False,
                                                 type=Sticker.REGULAR, emoji="😀",
                                                 set_name="KeelPack", file_size=23210)))
    add("private_location", "location",
        message=msg(21, PRIVATE, location=Location(longitude=13.404954, latitude=52.520008)))
    add("private_contact", "contact",
        message=msg(22, PRIVATE, contact=Contact("+4915112345678", "Bob", last_name="Builder",
                                                 user_id=112)))
    add("group_poll", "poll",
        message=msg(25, GROUP, poll=Poll("5843211230987654321", "Lunch where?",
                                         [PollOption("Pizza", 0, persistent_id="0"),
                                          PollOption("Sushi", 0, persistent_id="1")],
                                         total_voter_count=0, is_closed=False, is_anonymous=True,
                                         type=Poll.REGULAR, allows_multiple_answers=False,
                                         allows_revoting=True, members_only=False)))
    add("private_dice", "dice", message=msg(23, PRIVATE, dice=Dice(4, Dice.DICE)))

    # --- edits and channels ----------------------------------------------------
    add("edited_private_text", "edit",
        edited_message=text_msg(10, PRIVATE, "hello keel (edited)", date=at(0),
                                edit_date=at(len(cases))))
    post = dict(message_id=501, chat=CHANNEL, sender_chat=CHANNEL, author_signature="Ann",
                text="release 1.2 is out")
    add("channel_post_text", "channel_post", channel_post=Message(date=at(len(cases)), **post))
    post["text"] = "release 1.2.1 is out"
    add("edited_channel_post", "edit",
        edited_channel_post=Message(date=at(len(cases) - 1), edit_date=at(len(cases)), **post))

    # --- callback ----------------------------------------------------------------
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Yes", callback_data="confirm:yes"),
                                      InlineKeyboardButton("No", callback_data="confirm:no")]])
    button_msg = text_msg(24, PRIVATE, "Delete the reminder?", user=BOT, reply_markup=keyboard)
    add("callback_query_button", "callback",
        callback_query=CallbackQuery("4382000123456789012", ANN, chat_instance="-7000000000000000001",
                                     message=button_msg, data="confirm:yes"))

    # --- membership and service messages -----------------------------------------
    def member_update(chat, old, new, by=ANN):
        return ChatMemberUpdated(chat, by, at(len(cases)), old, new)

    forever = datetime.fromtimestamp(0, timezone.utc)  # until_date 0 == forever
    add("my_chat_member_kicked", "service",
        my_chat_member=member_update(PRIVATE, ChatMemberMember(BOT), ChatMemberBanned(BOT, forever)))
    add("my_chat_member_member_again", "service",
        my_chat_member=member_update(PRIVATE, ChatMemberBanned(BOT, forever), ChatMemberMember(BOT)))
    add("group_my_chat_member_added", "service",
        my_chat_member=member_update(GROUP, ChatMemberLeft(BOT), ChatMemberMember(BOT)))
    add("group_new_chat_members_bot_added", "service",
        message=msg(26, GROUP, new_chat_members=[BOT]))
    add("group_left_chat_member", "service",
        message=msg(27, GROUP, BOB, left_chat_member=BOB))
    add("group_migrate_to_chat_id", "service",
        message=msg(28, GROUP, migrate_to_chat_id=MIGRATED.id))
    add("supergroup_migrate_from_chat_id", "service",
        message=msg(1, MIGRATED, migrate_from_chat_id=GROUP.id))
    add("message_reaction", "reaction",
        message_reaction=MessageReactionUpdated(FORUM, 78, at(len(cases)), old_reaction=[],
                                                new_reaction=[ReactionTypeEmoji("👍")], user=ANN))

    # --- unicode ---------------------------------------------------------------
    t = "Hi 👋🏽 שלום עולם مرحبا 𝕂𝕖𝕖𝕝 🧑‍🚀 🇩🇪 **bold** end"
    add("unicode_text", "text",
        message=text_msg(25, PRIVATE, t, entities=[ent(MessageEntity.BOLD, t, "**bold**"),
                                                   ent(MessageEntity.ITALIC, t, "𝕂𝕖𝕖𝕝")]))
    t = ("😀" * 48) + "x" * (4096 - 96 - 2) + "𝕂"  # astral chars count 2 each
    assert len(t.encode("utf-16-le")) // 2 == 4096 and len(t) == 4096 - 49
    add("text_4096_utf16_units", "text", message=text_msg(26, PRIVATE, t))


def strip_false_flags(obj):
    if isinstance(obj, dict):
        for key in FALSE_ONLY_FLAGS:
            if obj.get(key) is False:
                del obj[key]
        for value in obj.values():
            strip_false_flags(value)
    elif isinstance(obj, list):
        for value in obj:
            strip_false_flags(value)
    return obj


def to_json_dict(update):
    """update.to_dict() as plain JSON, normalised to what the Bot API sends."""
    d = strip_false_flags(json.loads(json.dumps(update.to_dict())))  # enums -> str
    for key in ("old_reaction", "new_reaction"):
        if "message_reaction" in d:
            d["message_reaction"].setdefault(key, [])
    return d


def add_future_cases(out):
    """Shapes a newer Bot API might send; keel must ignore/store them, not crash."""
    base = to_json_dict(Update(0, message=text_msg(27, PRIVATE, "from the future", date=at(len(out)))))
    u = {"update_id": 0, "business_message_v9": copy.deepcopy(base["message"])}
    out.append({"name": "future_unknown_update_type", "kind": "unknown", "update": u})
    u = copy.deepcopy(base)
    u["message"]["message_id"] = 28
    u["message"]["future_field"] = {"x": 1}
    out.append({"name": "future_unknown_message_field", "kind": "text", "update": u})
    u = copy.deepcopy(base)
    del u["message"]["text"]
    u["message"]["message_id"] = 29
    u["message"]["hologram"] = {"file_id": "HOLOAgIAAxkBAAIJ", "file_unique_id": "AgADholo1",
                                "depth": 3, "duration": 5}
    out.append({"name": "future_unknown_content_type", "kind": "unknown", "update": u})
    for i, case in enumerate(out[-3:]):
        case["update"]["update_id"] = out[-4]["update"]["update_id"] + 1 + i


def library_kind(u):
    """How python-telegram-bot's parsed objects classify an update."""
    if u.callback_query:
        return "callback"
    if u.message_reaction:
        return "reaction"
    if u.my_chat_member:
        return "service"
    if u.edited_message or u.edited_channel_post:
        return "edit"
    m = u.message or u.channel_post
    if m is None:
        return "unknown"
    if m.new_chat_members or m.left_chat_member or m.migrate_to_chat_id or m.migrate_from_chat_id:
        return "service"
    for attr in ("photo", "document", "voice", "audio", "video", "sticker",
                 "location", "contact", "poll", "dice"):
        if getattr(m, attr):
            return attr
    if m.text:
        return "channel_post" if u.channel_post else "text"
    return "unknown"


def validate(out):
    bot = Bot("999:TEST")  # never used for a request: no network
    ids = [c["update"]["update_id"] for c in out]
    assert ids[0] == 1000 and all(a < b for a, b in zip(ids, ids[1:])), ids
    assert len({c["name"] for c in out}) == len(out), "duplicate case name"
    for c in out:
        assert c["kind"] in KINDS, c["name"]
        parsed = Update.de_json(copy.deepcopy(c["update"]), bot)
        assert isinstance(parsed, Update), c["name"]
        assert to_json_dict(parsed) == c["update"], c["name"]
        assert library_kind(parsed) == c["kind"], (c["name"], library_kind(parsed))
        m = parsed.effective_message
        if m:  # entity offsets/lengths are UTF-16 units; the library slices by them
            assert all(m.parse_entity(e) for e in m.entities), c["name"]
            assert all(m.parse_caption_entity(e) for e in m.caption_entities), c["name"]
    uni = next(c for c in out if c["name"] == "unicode_text")["update"]["message"]
    parsed = Message.de_json(copy.deepcopy(uni), bot)
    assert sorted(parsed.parse_entities().values()) == ["**bold**", "𝕂𝕖𝕖𝕝"]
    edited = next(c for c in out if c["name"] == "edited_private_text")
    first = next(c for c in out if c["name"] == "private_text")
    assert edited["update"]["edited_message"]["message_id"] == first["update"]["message"]["message_id"]


def main():
    build()
    out = [{"name": n, "kind": k, "update": to_json_dict(u)} for n, k, u in cases]
    add_future_cases(out)
    validate(out)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "updates.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)  # ASCII with \u escapes, like the Bot API
        f.write("\n")
    print(f"wrote {path}: {len(out)} cases, python-telegram-bot {telegram.__version__}"
          f" (Bot API {telegram.__bot_api_version__})")


if __name__ == "__main__":
    main()
